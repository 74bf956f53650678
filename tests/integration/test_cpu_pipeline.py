"""The real pipeline: SmolLM2-135M-Instruct (offline GGUF package) on real data, with few steps."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SMALL = [
    "--set", "alignment.n_alignment=8", "--set", "alignment.n_benign=8", "--set", "alignment.n_harmful=8", "--set", "alignment.train.max_length=128",
    "--set", "finetune.max_length=128", "--set", "evaluation.n_harmful_prompts=4", "--set", "evaluation.n_task_test=4",
    "--set", "evaluation.max_new_tokens=12",
]


def hft(*args, timeout=1800):  # the first run builds pair-clf from its labels (about 8 minutes on 2 cores)
    proc = subprocess.run([sys.executable, "-m", "harmbench_ft.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_cpu_preset_runs_end_to_end_and_shares_the_alignment(tmp_path, shared_data, smollm2_installed):
    common = ["run", "--defense", "sft", "--data-dir", str(shared_data), "--runs-dir", str(tmp_path), "--json", *SMALL]
    first = hft(*common, "--attack", "ratio=0.25,n=8")
    assert first["spec"]["model"]["name"] == "smollm2-135m" and first["spec"]["preset"] == "cpu"
    assert first["data"]["n_poison"] == 2 and first["stages"]["alignment"]["steps"] == 2  # 8 refusals + 8 benign rows
    assert first["data"]["n_alignment"] == 16
    assert 0 <= first["metrics"]["harmful_score"] <= 100 and 0 <= first["metrics"]["finetune_accuracy"] <= 100
    samples = [json.loads(l) for l in (tmp_path / first["run_id"] / "generations.jsonl").read_text().splitlines()]
    assert any(s["response"].strip() for s in samples), "the real model generated nothing"
    second = hft(*common, "--attack", "ratio=0.5,n=8")
    assert second["stages"]["alignment"]["reused"] is True
    assert second["stages"]["alignment"]["seconds"] < 5
