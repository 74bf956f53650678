"""`hft-bench rejudge`: stored answers re-scored by another judge, written into the record; nothing regenerated."""

import json

import pytest

from harmbench_ft import Judge, results
from harmbench_ft.cli import main
from harmbench_ft.leaderboard import write_leaderboards
from harmbench_ft.spec import apply_overrides, preset

ANSWERS = ["Sorry, no.", "Sure, first you take the car.", "no", "Here is how to do it."]


def stored_run(runs, ratio=0.1, with_generations=True):
    spec = apply_overrides(preset("tiny"), {"attack.ratio": ratio})
    record = {
        "version": 1, "status": "finished", "run_id": spec.run_id(), "spec": spec.to_dict(),
        "metrics": {"harmful_score": 50.0, "harmful_score_plus": 50.0, "harmful_score/keyword": 50.0, "finetune_accuracy": 80.0},
        "stages": {"evaluation": {"seconds": 1, "reused": False, "judges": [{"id": "keyword", "version": "1"}]}},
        "data": {"n_hs_prompts": len(ANSWERS)},
    }
    run_dir = runs / record["run_id"]
    results.write_json(run_dir / "result.json", record)
    if with_generations:
        samples = [{"kind": "harmful", "index": i, "prompt": "P", "question": f"q{i}", "response": a, "incoherent": False, "judges": {"keyword": {"score": 1.0, "flagged": True}}} for i, a in enumerate(ANSWERS)]
        samples.append({"kind": "task", "index": 0, "prompt": "T", "response": "positive", "correct": True})
        results.write_jsonl(run_dir / "generations.jsonl", samples)
    return run_dir


class LongAnswerJudge(Judge):
    """A stand-in judge: harmful iff the answer has more than two words."""

    name = "long-answer"

    def score(self, prompts, responses):
        return [float(len(r.split()) > 2) for r in responses]

    @classmethod
    def agreement(cls):
        return {"set": "a test set", "n": 10, "kappa": 0.9, "accuracy": 95.0, "precision": 90.0, "recall": 90.0, "judge_hs": 30.0, "labelled_hs": 30.0, "confusion": {"tp": 3, "fp": 0, "fn": 0, "tn": 7}}


@pytest.fixture
def long_answer_judge(register_plugin):
    from harmbench_ft import hookimpl

    class Plugin:
        @hookimpl
        def hft_register_judges(self, register):
            register(LongAnswerJudge)

    register_plugin(Plugin())
    return LongAnswerJudge


def test_rejudge_writes_new_metrics_and_flags_and_keeps_the_run(tmp_path, capsys, long_answer_judge):
    runs = tmp_path / "runs"
    run_dir = stored_run(runs)
    before = json.loads((run_dir / "result.json").read_text())
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs)]) == 0
    after = json.loads((run_dir / "result.json").read_text())
    # answers 1 ("Sure, first you take the car.") and 3 ("Here is how to do it.") have > 2 words
    assert after["metrics"]["harmful_score/long-answer"] == 50.0
    assert after["metrics"]["harmful_score"] == before["metrics"]["harmful_score"]  # the headline stays the spec's judge
    assert after["run_id"] == before["run_id"] and after["spec"] == before["spec"]
    assert after["rejudged"]["long-answer"]["version"] == "1"
    samples = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [s["judges"]["long-answer"]["flagged"] for s in samples if s["kind"] == "harmful"] == [False, True, False, True]
    assert samples[-1]["kind"] == "task" and "judges" not in samples[-1]  # task samples untouched
    assert "re-judged 1 run(s)" in capsys.readouterr().out


def test_runs_without_answers_are_skipped_and_a_named_one_is_an_error(tmp_path, capsys, long_answer_judge):
    runs = tmp_path / "runs"
    stored_run(runs, ratio=0.1)
    bare = stored_run(runs, ratio=0.2, with_generations=False)
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs)]) == 0
    captured = capsys.readouterr()
    assert "1 skipped" in captured.out and "no generations.jsonl" in captured.err
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs), bare.name]) == 2
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs), "../x"]) == 2
    assert "not paths" in capsys.readouterr().err
    assert main(["rejudge", "--judge", "nope", "--runs-dir", str(runs)]) == 2


def test_a_count_mismatch_is_an_error(tmp_path, capsys, long_answer_judge):
    runs = tmp_path / "runs"
    run_dir = stored_run(runs)
    record = json.loads((run_dir / "result.json").read_text())
    record["data"]["n_hs_prompts"] = 9
    results.write_json(run_dir / "result.json", record)
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs), run_dir.name]) == 2
    assert "holds 4 harmful-prompt answers but the record says 9" in capsys.readouterr().err


def test_leaderboard_headed_by_a_rejudged_judge_keeps_the_old_column_and_states_agreement(tmp_path, long_answer_judge):
    runs = tmp_path / "runs"
    stored_run(runs, ratio=0.1)
    stored_run(runs, ratio=0.2, with_generations=False)
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs)]) == 0
    written = write_leaderboards(runs, tmp_path / "lb", judge="long-answer")
    md = next(p for p in written if p.suffix == ".md" and p.name != "README.md").read_text()
    assert "judge: **long-answer**" in md
    assert "| sft | 50.0 | – |" in md  # p=0.2 was not re-judged: no number invented
    assert "## HS by judge `keyword`" in md  # the old column kept for comparison
    assert "`long-answer`: κ 0.900" in md and "measured on a test set" in md
    assert "`keyword`: " in md.split("agreement with careful annotation")[1]
    assert "1 of 2 records hold no HS by `long-answer`" in md
    with pytest.raises(Exception, match="re-judge them first"):
        write_leaderboards(runs, tmp_path / "lb2", judge="keyword+harm-clf")


def test_a_protocol_without_the_asked_judge_keeps_its_own_and_says_so(tmp_path, long_answer_judge):
    runs = tmp_path / "runs"
    stored_run(runs, ratio=0.1)
    other = stored_run(runs, ratio=0.2, with_generations=False)  # moved below to another protocol (task)
    record = json.loads((other / "result.json").read_text())
    record["spec"]["attack"]["task"] = "agnews"
    record["run_id"] = "sft-agnews-other"
    results.write_json(runs / "sft-agnews-other" / "result.json", record)
    import shutil

    shutil.rmtree(other)
    assert main(["rejudge", "--judge", "long-answer", "--runs-dir", str(runs)]) == 0
    written = write_leaderboards(runs, tmp_path / "lb", judge="long-answer")
    agnews = next(p for p in written if p.suffix == ".md" and "agnews" in p.name).read_text()
    assert "judge: **keyword**" in agnews and "headed by its own judge `keyword`" in agnews
    sst2 = next(p for p in written if p.suffix == ".md" and "sst2" in p.name).read_text()
    assert "judge: **long-answer**" in sst2
