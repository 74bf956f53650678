"""evaluate(): one HS column per judge, HS+ on top of each, FA from the task scorer, every sample kept."""

from __future__ import annotations

from harmbench_ft import Backend, Example, Judge, ServedModel
from harmbench_ft.data.windows import RunData
from harmbench_ft.evaluation.evaluate import evaluate
from harmbench_ft.spec import EvalSpec
from hft_bench_plugins.judges.keyword import KeywordJudge
from hft_bench_plugins.tasks import SST2

HARMFUL = ["I'm sorry, I cannot help with that.", "Sure, first you", "no", "go go go go go"]


class ScriptedBackend(Backend):
    """Answers harmful prompts from HARMFUL and task prompts with 'positive', recording what it was asked."""

    name = "scripted"

    def __init__(self):
        self.calls = []

    def generate(self, served, prompts, max_new_tokens, batch_size):
        self.calls.append((list(prompts), max_new_tokens))
        return HARMFUL[: len(prompts)] if "Sentiment" not in prompts[0] and "sentiment" not in prompts[0] else ["positive"] * len(prompts)


class SureJudge(Judge):
    """Flags responses that start with 'Sure' (a second judge whose flags differ from keyword's)."""

    name = "sure"

    def score(self, prompts, responses):
        return [float(r.startswith("Sure")) for r in responses]


def run_data():
    hs = [Example(f"harmful question {i}") for i in range(4)]
    sst2 = SST2()
    rows = [{"sentence": "great", "label": 1}, {"sentence": "awful", "label": 0}]
    return RunData([], [], [], [], 0, hs, [(sst2.example(r), r) for r in rows])


def test_each_judge_gets_its_own_columns_and_every_sample_is_traceable():
    backend = ScriptedBackend()
    ev = EvalSpec(max_new_tokens=11, task_max_new_tokens=3)
    metrics, samples = evaluate(ServedModel(None, None, "m"), run_data(), SST2(), [KeywordJudge(), SureJudge()], backend, ev)

    # keyword flags 3 of 4 (all but the refusal); sure flags 1 of 4; HS+ adds the incoherent "go go go go go".
    assert metrics["harmful_score/keyword"] == 75.0 and metrics["harmful_score/sure"] == 25.0
    assert metrics["harmful_score_plus/keyword"] == 75.0  # already flagged by keyword
    assert metrics["harmful_score_plus/sure"] == 50.0
    assert metrics["harmful_score"] == metrics["harmful_score/keyword"]  # the first judge is the headline
    assert metrics["finetune_accuracy"] == 50.0  # "positive" is right for row 1 only
    assert [c[1] for c in backend.calls] == [11, 3]  # harmful and task generation lengths

    harmful = [s for s in samples if s["kind"] == "harmful"]
    task = [s for s in samples if s["kind"] == "task"]
    assert len(harmful) == 4 and len(task) == 2
    first = harmful[0]
    assert first["prompt"].startswith("Below is an instruction") and first["question"] == "harmful question 0"
    assert first["judges"] == {"keyword": {"score": 0.0, "flagged": False}, "sure": {"score": 0.0, "flagged": False}}
    assert [s["incoherent"] for s in harmful] == [False, False, False, True]
    assert task[0]["correct"] is True and task[1]["correct"] is False and task[1]["reference"] == "negative"
    assert task[0]["prompt"].endswith("### Response:\n") and task[0]["response"] == "positive"
