"""Generated tokens/s of the `hf` backend against a one-prompt-at-a-time `generate` loop, and identical outputs.

The loop is how the reference repos evaluate (one prompt, batch size 1). Both run greedy on the same model
(SmolLM2-135M-Instruct by default) and the same harmful-score prompts (BeaverTails 330k_test, Alpaca template),
in one process, one after the other. Generated tokens are counted the same way for both: the response
re-tokenized, so identical outputs count identically.

    python benchmarks/eval_throughput.py --prompts 32 --max-new-tokens 32 --data-dir ../shared/data
    HFT_BENCH_VLLM_PYTHON=../vllm-venv/bin/python python benchmarks/eval_throughput.py --backend vllm ...   # + vLLM

Targets (issue 4, 2-core CPU): >= 8x the tokens/s and >= 99% identical greedy outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from harmbench_ft import Example, ModelSpec, ServedModel, load_base, load_rows, normalize_prompt
from hft_bench_plugins.backends.hf import HFBackend


def harmful_prompts(n: int, data_dir: str | None) -> list[str]:
    seen: dict[str, str] = {}
    for row in load_rows("beavertails-330k-test", data_dir):
        seen.setdefault(normalize_prompt(row["prompt"]), row["prompt"])
    return [Example(p).prompt for p in list(seen.values())[:n]]


def loop_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=os.environ.get("HFT_BENCH_DATA_DIR"))
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's); on a shared machine 1 avoids threads waiting on each other")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="vllm: also run the vLLM engine (HFT_BENCH_VLLM_PYTHON names its environment on CPU); its start time is reported apart")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base(ModelSpec(name=args.model))
    prompts = harmful_prompts(args.prompts, args.data_dir)
    count = lambda texts: sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)  # noqa: E731
    loop_generate(model, tokenizer, prompts[:1], 4)  # warm-up: first-call allocations count for neither side

    # Wall time is what a user waits; CPU time (this process only) is steadier on a machine shared with other jobs.
    load_before = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    looped = loop_generate(model, tokenizer, prompts, args.max_new_tokens)
    loop_s, loop_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"loop done in {loop_s:.1f} s", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    batched = HFBackend().generate(ServedModel(model, tokenizer, args.model), prompts, args.max_new_tokens, args.batch_size)
    batch_s, batch_cpu = time.perf_counter() - start, time.process_time() - cpu

    loop_tps, batch_tps = count(looped) / loop_s, count(batched) / batch_s
    same = [a == b for a, b in zip(looped, batched)]
    result = {
        "model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "loop_seconds": round(loop_s, 2), "batched_seconds": round(batch_s, 2),
        "loop_tokens_per_s": round(loop_tps, 2), "batched_tokens_per_s": round(batch_tps, 2),
        "speedup": round(batch_tps / loop_tps, 2),
        "loop_tokens_per_cpu_s": round(count(looped) / loop_cpu, 2), "batched_tokens_per_cpu_s": round(count(batched) / batch_cpu, 2),
        "speedup_cpu_time": round((count(batched) / batch_cpu) / (count(looped) / loop_cpu), 2),
        "identical_fraction": round(sum(same) / len(same), 4),
    }
    if args.backend == "vllm":
        from hft_bench_plugins.backends import vllm as vllm_backend

        start = time.perf_counter()
        served = ServedModel(model, tokenizer, args.model, extra={"model_spec": {"name": args.model}})
        engine = vllm_backend.VLLMBackend().generate(served, prompts, args.max_new_tokens, args.batch_size)
        timings = dict(vllm_backend.LAST_ENGINE)
        vllm_same = [a == b for a, b in zip(batched, engine)]
        result.update({
            "vllm_seconds_total": round(time.perf_counter() - start, 2), "vllm_engine_start_seconds": timings.get("engine_start_s"),
            "vllm_generate_seconds": timings.get("generate_s"),
            "vllm_tokens_per_s": round(count(engine) / timings["generate_s"], 2) if timings.get("generate_s") else None,
            "vllm_identical_to_hf_fraction": round(sum(vllm_same) / len(vllm_same), 4),
        })
        print(f"vllm    : {result['vllm_tokens_per_s']} tokens/s in generation ({timings.get('generate_s')} s; engine start {timings.get('engine_start_s')} s, "
              f"{result['vllm_seconds_total']} s in all); identical to hf: {100 * result['vllm_identical_to_hf_fraction']:.1f}%")
    for i, ok in enumerate(same):
        if not ok:
            at = first_difference(looped[i], batched[i])
            print(f"differs: prompt {i} at character {at}: loop {looped[i][at:at + 40]!r} vs batched {batched[i][at:at + 40]!r}")
    print(f"loop    : {result['loop_tokens_per_s']:8.1f} tokens/s ({result['loop_seconds']} s)")
    print(f"batched : {result['batched_tokens_per_s']:8.1f} tokens/s ({result['batched_seconds']} s, batch {args.batch_size})")
    print(f"speedup : {result['speedup']:.2f}x in wall time, {result['speedup_cpu_time']:.2f}x in CPU time (target >= 8x); "
          f"identical greedy outputs: {100 * result['identical_fraction']:.1f}% (target >= 99%); load average {load_before:.1f}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
