"""The vllm backend's engine arguments, greedy sampling and LoRA request, against a fake engine (vLLM is GPU-only)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from harmbench_ft import ServedModel, UsageError
from harmbench_ft.models.tiny import build_tiny
from hft_bench_plugins.backends import vllm as vllm_backend
from hft_bench_plugins.backends.vllm import VLLMBackend, VLLMJob, engine_arguments


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLoRARequest:
    def __init__(self, name, int_id, path):
        self.args = (name, int_id, path)


class FakeVLLMEngine:
    """Stands in for vllm.LLM: records what it was built and called with, echoes the prompt length back."""

    built: list[dict] = []
    calls: list[tuple] = []

    def __init__(self, **kwargs):
        FakeVLLMEngine.built.append(kwargs)

    def generate(self, prompts, sampling, lora_request=None, use_tqdm=True):
        FakeVLLMEngine.calls.append((prompts, sampling, lora_request))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"len={len(p['prompt_token_ids'])}")]) for p in prompts]


FAKE_API = SimpleNamespace(LLM=FakeVLLMEngine, SamplingParams=FakeSamplingParams, LoRARequest=FakeLoRARequest)


@pytest.fixture(autouse=True)
def fresh_fake(tmp_path, monkeypatch):
    FakeVLLMEngine.built, FakeVLLMEngine.calls = [], []
    monkeypatch.setenv("HFT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HFT_BENCH_VLLM_LORA", "on")  # these tests check the LoRA request, on any machine
    monkeypatch.delenv("HFT_BENCH_VLLM_PYTHON", raising=False)  # CI exports it for the real-engine tests; these are in-process


def served_with_adapter(tmp_path, rank: int | None):
    model, tok = build_tiny("tiny-llama")
    adapter = None
    if rank is not None:
        adapter = tmp_path / "final"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "target_modules": ["q_proj"]}))
    return ServedModel(model, tok, "tiny-llama", None, adapter)


def test_lora_mode_serves_the_finetune_adapter_on_a_saved_merged_base(tmp_path):
    served = served_with_adapter(tmp_path, rank=4)
    backend = VLLMBackend(api=FAKE_API, isolate=False, tensor_parallel_size=2)
    out = backend.generate(served, ["ab", "abcd"], max_new_tokens=7, batch_size=99)

    assert out == ["len=2", "len=4"]  # order kept; byte tokenizer: one id per character, no BOS added
    (engine,) = FakeVLLMEngine.built
    assert engine["tensor_parallel_size"] == 2 and engine["enable_lora"] is True and engine["max_loras"] == 1
    assert engine["max_lora_rank"] == 8  # rank 4 rounded up to the smallest rank vLLM accepts
    assert (tmp_path / "cache" / "vllm" / "base").is_dir() and engine["model"].startswith(str(tmp_path / "cache" / "vllm" / "base"))
    assert (tmp_path.joinpath(engine["model"]) / "config.json").is_file()  # a real saved model folder
    prompts, sampling, lora = FakeVLLMEngine.calls[0]
    assert sampling.kwargs["temperature"] == 0.0 and sampling.kwargs["max_tokens"] == 7  # greedy
    assert lora.args == ("finetune", 1, str(served.final_adapter))
    assert prompts[0]["prompt_token_ids"] == served.tokenizer("ab", add_special_tokens=False)["input_ids"]


def test_merged_base_is_saved_once_and_reused(tmp_path):
    served = served_with_adapter(tmp_path, rank=4)
    backend = VLLMBackend(api=FAKE_API, isolate=False)
    first = backend.merged_base(served)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert backend.merged_base(served) == first and (first / "config.json").stat().st_mtime_ns == stamp


def test_without_a_servable_adapter_the_fully_merged_model_is_served(tmp_path):
    served = served_with_adapter(tmp_path, rank=None)
    with torch.no_grad():
        served.model.lm_head.weight.add_(1.0)  # the in-memory model is what must be saved
    VLLMBackend(api=FAKE_API, isolate=False).generate(served, ["x"], max_new_tokens=3, batch_size=1)
    (engine,) = FakeVLLMEngine.built
    assert "enable_lora" not in engine and "/merged/" in engine["model"]
    assert FakeVLLMEngine.calls[0][2] is None
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path.joinpath(engine["model"]) / "model.safetensors"))
    torch.testing.assert_close(saved["lm_head.weight"], served.model.lm_head.weight)


def test_too_large_rank_falls_back_to_merged(tmp_path):
    served = served_with_adapter(tmp_path, rank=1024)
    job = VLLMBackend(api=FAKE_API, isolate=False).job(served, ["x"], 2)
    assert job.lora_dir is None and "/merged/" in job.model_dir


def test_spawned_engine_process_returns_the_outputs():
    job = VLLMJob(model_dir="m", prompt_token_ids=[[1, 2, 3]], max_new_tokens=2)
    assert VLLMBackend(api=FAKE_API, isolate=True).run(job) == ["len=3"]
    assert FakeVLLMEngine.built == []  # the engine was built in the child process, not here


def test_missing_vllm_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(UsageError, match=r"pip install 'hft-bench\[vllm\]'"):
        VLLMBackend().generate(served_with_adapter(tmp_path, rank=4), ["x"], 2, 1)
    assert not (tmp_path / "cache" / "vllm").exists()  # failed before saving anything


def test_engine_arguments_without_lora():
    args = engine_arguments(VLLMJob(model_dir="m", prompt_token_ids=[], max_new_tokens=1, tensor_parallel_size=4))
    assert args["tensor_parallel_size"] == 4 and "enable_lora" not in args


@pytest.mark.gpu
def test_real_vllm_engine_generates_greedily(tmp_path):
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vLLM and a CUDA GPU (pip install 'hft-bench[vllm]')")
    served = served_with_adapter(tmp_path, rank=None)
    out = VLLMBackend().generate(served, ["hello", "hello"], max_new_tokens=4, batch_size=2)
    assert len(out) == 2 and out[0] == out[1]  # greedy: the same prompt gives the same text


def test_merged_base_is_built_from_the_runs_full_model_spec(tmp_path, monkeypatch):
    served = served_with_adapter(tmp_path, rank=4)
    served.extra = {"model_spec": {"name": "tiny-llama", "revision": "abc123", "trust_remote_code": False}}
    seen = []
    monkeypatch.setattr(vllm_backend, "load_base", lambda spec: seen.append(spec) or build_tiny("tiny-llama"))
    VLLMBackend(api=FAKE_API, isolate=False).merged_base(served)
    assert seen[0].revision == "abc123" and seen[0].name == "tiny-llama"


class FakeCore:
    shut_down = 0

    def shutdown(self):
        FakeCore.shut_down += 1


class FakeEngineWithCore(FakeVLLMEngine):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.llm_engine = SimpleNamespace(engine_core=FakeCore())


def test_the_engine_core_is_shut_down_after_generating_and_after_a_failure(tmp_path):
    """Issue 19 (1): left running, the engine core kept the spawned worker from exiting: the run hung."""
    FakeCore.shut_down = 0
    api = SimpleNamespace(LLM=FakeEngineWithCore, SamplingParams=FakeSamplingParams, LoRARequest=FakeLoRARequest)
    served = served_with_adapter(tmp_path, rank=None)
    VLLMBackend(api=api, isolate=False).generate(served, ["ab"], max_new_tokens=3, batch_size=1)
    assert FakeCore.shut_down == 1

    class Failing(FakeEngineWithCore):
        def generate(self, *args, **kwargs):
            raise RuntimeError("engine failed")

    with pytest.raises(RuntimeError):
        VLLMBackend(api=SimpleNamespace(LLM=Failing, SamplingParams=FakeSamplingParams, LoRARequest=FakeLoRARequest), isolate=False).generate(served, ["ab"], 3, 1)
    assert FakeCore.shut_down == 2


def test_the_engine_runs_in_the_served_precision_and_eager_with_a_bounded_kv_cache_on_cpu(tmp_path, monkeypatch):
    """Issue 19 (2)-(4): fp32 as the hf backend (vLLM downcast to bf16 and changed answers); on CPU, eager (no
    3-minute compile, no caches outside the run) and a KV cache of HFT_BENCH_VLLM_CPU_KVCACHE_GIB, not 85% of RAM."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("HFT_BENCH_VLLM_CPU_KVCACHE_GIB", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    served = served_with_adapter(tmp_path, rank=4)
    backend = VLLMBackend(api=FAKE_API, isolate=False)
    backend.generate(served, ["ab"], max_new_tokens=3, batch_size=1)
    (engine,) = FakeVLLMEngine.built
    assert engine["dtype"] == "float32" and engine["enforce_eager"] is True
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    (call,) = backend.describe()["calls"]  # what the result's provenance records
    assert call["engine_arguments"]["enforce_eager"] is True and call["engine_arguments"]["dtype"] == "float32"
    assert call["environment"] == {"VLLM_CPU_KVCACHE_SPACE": "2"} and call["lora"] is True and "model" not in call["engine_arguments"]
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    VLLMBackend(api=FAKE_API, isolate=False).generate(served, ["ab"], max_new_tokens=3, batch_size=1)
    assert "enforce_eager" not in FakeVLLMEngine.built[-1] and "VLLM_CPU_KVCACHE_SPACE" not in os.environ


FAKE_VLLM_PACKAGE = '''
from types import SimpleNamespace
class SamplingParams:
    def __init__(self, **kw): self.kw = kw
class LLM:
    def __init__(self, **kw): self.kw = kw
    def generate(self, prompts, sampling, lora_request=None, use_tqdm=True):
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"{self.kw['dtype']}:{len(p['prompt_token_ids'])}")]) for p in prompts]
'''


def test_the_engine_can_run_in_another_interpreter(tmp_path, monkeypatch):
    """HFT_BENCH_VLLM_PYTHON: the job goes to `python -m hft_bench_plugins.backends.vllm` as JSON (vLLM's CPU build pins
    an older transformers than the project's); here that interpreter finds a stand-in `vllm` package."""
    import sys

    fake = tmp_path / "fake_vllm"
    (fake / "vllm" / "lora").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM_PACKAGE)
    (fake / "vllm" / "lora" / "__init__.py").write_text("")
    (fake / "vllm" / "lora" / "request.py").write_text("class LoRARequest:\n    def __init__(self, *a): self.a = a\n")
    monkeypatch.setenv("PYTHONPATH", str(fake) + ":" + ":".join(sys.path))
    monkeypatch.setenv("HFT_BENCH_VLLM_PYTHON", sys.executable)
    served = served_with_adapter(tmp_path, rank=None)
    backend = VLLMBackend(api=FAKE_API)  # isolate=True: the interpreter path
    assert backend.run(backend.job(served, ["ab", "abcd"], 5)) == ["float32:2", "float32:4"]
    assert {"engine_start_s", "generate_s"} <= set(vllm_backend.LAST_ENGINE)  # timed in the engine's interpreter
    (call,) = backend.describe()["calls"]
    assert call["interpreter"] == sys.executable and call["generate_s"] == vllm_backend.LAST_ENGINE["generate_s"]

    monkeypatch.setenv("HFT_BENCH_VLLM_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(UsageError, match="HFT_BENCH_VLLM_PYTHON=.*is not a file"):
        backend.run(backend.job(served, ["ab"], 5))
    monkeypatch.setenv("HFT_BENCH_VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", ":".join(sys.path))  # no vllm there: one clear error, not a hang
    with pytest.raises(RuntimeError, match="the vLLM engine in .* failed"):
        backend.run(backend.job(served, ["ab"], 5))


def test_on_cpu_a_finetune_adapter_is_merged_into_the_served_weights_unless_lora_is_asked_for(tmp_path, monkeypatch):
    """HFT_BENCH_VLLM_LORA=auto (the default): a LoRA request on a GPU; on the CPU build, where vLLM's LoRA path
    generated several times slower, the merged model; `on` and `off` force either; anything else is one line."""
    served = served_with_adapter(tmp_path, rank=8)
    monkeypatch.setenv("HFT_BENCH_VLLM_LORA", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = VLLMBackend(api=FAKE_API, isolate=False).job(served, ["ab"], 3)
    assert job.lora_dir is None and "merged" in job.model_dir
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert VLLMBackend(api=FAKE_API, isolate=False).job(served, ["ab"], 3).lora_dir == str(served.final_adapter)
    monkeypatch.setenv("HFT_BENCH_VLLM_LORA", "off")
    assert VLLMBackend(api=FAKE_API, isolate=False).job(served, ["ab"], 3).lora_dir is None
    monkeypatch.setenv("HFT_BENCH_VLLM_LORA", "yes")
    with pytest.raises(UsageError, match="HFT_BENCH_VLLM_LORA='yes': one of auto, on, off"):
        VLLMBackend(api=FAKE_API)
