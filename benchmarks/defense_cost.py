"""Seconds per optimizer step and peak memory of every defense, as ratios to SFT.

In one process, on the same model, the same LoRA and the same fixed batches, each defense's step
(the whole update: every forward/backward it needs) is timed after a warm-up, the median of --repeats.
Peak memory is the largest resident-set growth over the step, sampled every 2 ms after returning freed
memory to the OS (malloc_trim), so it counts what a step allocates, not the model. On CUDA it is
torch.cuda.max_memory_allocated instead.

    python benchmarks/defense_cost.py --model smollm2-135m --data-dir ../shared/data
    python benchmarks/defense_cost.py --model tiny-llama --repeats 2      # a smoke run

Targets (the inherent pass counts plus <= 10%): Booster <= 3.3x, Panacea <= 3.3x, Vaccine <= 2.2x,
RepNoise <= 3x, Lisa <= 1.1x. random-perturbation has no training step (a one-off edit, timed apart).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time
from pathlib import Path

import torch

from harmbench_ft.data.formatting import collate, tokenize_example
from harmbench_ft.data.windows import build_run_data
from harmbench_ft.defense import PostContext, Stage, StepContext
from harmbench_ft.models.loading import add_lora, load_base
from harmbench_ft.plugins import get_registry
from harmbench_ft.spec import ModelSpec, apply_overrides, preset

TARGETS = {"booster": 3.3, "panacea": 3.3, "vaccine": 2.2, "repnoise": 3.0, "lisa": 1.1}


class Fixed:
    """Serves the same micro-batches every step, so every defense sees identical data."""

    def __init__(self, batches, pad_id=None):
        self.batches, self.pad_id = batches, pad_id  # pad_id: RepNoise widens a paired batch with it, as BatchStream does

    def next_step(self):
        return self.batches


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakMemory:
    """Peak growth of memory over a block: CUDA allocator stats, else sampled RSS after malloc_trim."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak = cuda, 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--own-streams", action="store_true", help="each stream serves its own rows, not the shared alignment batch (needed for RepNoise's original loss)")
    parser.add_argument("--defenses", default="sft,booster,vaccine,repnoise,lisa,panacea,random-perturbation",
                        help="comma-separated; NAME:K=V;K=V times a defense with those parameters (repnoise:variant=response-tokens)")
    args = parser.parse_args(argv)

    spec = apply_overrides(preset("cpu"), {"model.name": args.model, "alignment.train.batch_size": args.batch_size, "finetune.batch_size": args.batch_size, "alignment.train.max_length": args.max_length, "finetune.max_length": args.max_length})
    registry = get_registry()
    data = build_run_data(spec, registry.get("tasks", "sst2"), args.data_dir)
    model, tokenizer = load_base(ModelSpec(args.model))
    torch.manual_seed(0)
    model = add_lora(model, spec.finetune)
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    start_weights = [p.detach().clone() for p in params]

    def batches(examples):
        rows = [tokenize_example(tokenizer, e, args.max_length) for e in examples[: args.batch_size]]
        batch = collate(rows, tokenizer.pad_token_id)
        return [{k: v.cuda() for k, v in batch.items()} if cuda else batch]

    # Every stream serves the same batch (the first alignment rows), so a ratio to SFT counts passes and
    # overheads only, not that harmful answers are longer than SST2 answers. (In a real run the provider's
    # harmful rows average ~121 tokens against ~77 for SST2 user rows, so Booster/Panacea/RepNoise steps cost
    # more there than these ratios say.)
    same = batches(data.alignment)
    streams = {s: Fixed(same) for s in ("alignment", "harmful", "harmful_refusals", "user")}
    if args.own_streams:  # each stream its own rows: RepNoise's original loss masks where harmful and refusal ids differ,
        # which on one shared batch is nowhere (a step without its lens terms)
        streams = {"alignment": Fixed(same), "harmful": Fixed(batches(data.harmful), tokenizer.pad_token_id), "harmful_refusals": Fixed(batches(data.harmful_refusals), tokenizer.pad_token_id), "user": Fixed(batches(data.user))}
    rows = []
    for entry in args.defenses.split(","):
        name, _, given = entry.partition(":")
        cls = registry.get("defenses", name)
        defense = cls(cls.make_params(dict(kv.split("=", 1) for kv in given.split(";") if kv)))
        name = entry
        if defense.stages and all(s is Stage.POST_FINETUNE for s in defense.stages):
            ctx = PostContext(model, params, names, 0, Path("/tmp"))
            start = time.perf_counter()
            with torch.no_grad():
                defense.post_finetune(ctx)
            rows.append({"defense": name, "stage": "post_finetune", "s_per_step": None, "peak_mb": None, "once_s": time.perf_counter() - start})
        else:
            stage = Stage.FINETUNE if Stage.FINETUNE in defense.stages else Stage.ALIGNMENT
            for sft_stage in ([stage] if name != "sft" else [Stage.ALIGNMENT, Stage.FINETUNE]):  # SFT: a baseline per stage
                source = defense.schedule(sft_stage, 1)[0] if defense.stages else ("alignment" if sft_stage is Stage.ALIGNMENT else "user")
                times, peaks = [], []
                for i in range(args.repeats + 1):  # the first is a warm-up
                    ctx = StepContext(model, params, names, sft_stage, 200 + i, 1000, source, streams)
                    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=args.bf16), PeakMemory(cuda) as mem:
                        start = time.perf_counter()
                        defense.step(ctx, streams[source].next_step())
                        if cuda:
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - start
                    if i:
                        times.append(elapsed)
                        peaks.append(mem.peak / 2**20)
                rows.append({"defense": name, "stage": sft_stage.value, "s_per_step": statistics.median(times), "peak_mb": max(peaks)})
        with torch.no_grad():
            for p, w in zip(params, start_weights):
                p.copy_(w)

    sft = {r["stage"]: r for r in rows if r["defense"] == "sft"}
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model}, batch {args.batch_size} x <= {args.max_length} tokens, bf16 {args.bf16}, {device}, median of {args.repeats}")
    print(f"{'defense':22} {'stage':14} {'s/step':>8} {'x SFT':>6} {'target':>7} {'peak MB':>8} {'x SFT':>6}")
    for r in rows:
        if r["s_per_step"] is None:
            print(f"{r['defense']:22} {r['stage']:14} one-off edit {r['once_s']:.3f} s (no training step)")
            continue
        base = sft[r["stage"]]
        r["time_ratio"] = r["s_per_step"] / base["s_per_step"]
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else float("nan")
        target = TARGETS.get(r["defense"].partition(":")[0])
        verdict = "" if target is None else ("ok" if r["time_ratio"] <= target else "OVER")
        print(f"{r['defense']:22} {r['stage']:14} {r['s_per_step']:8.3f} {r['time_ratio']:6.2f} {('<=' + str(target)) if target else '':>7} {r['peak_mb']:8.0f} {r['memory_ratio']:6.2f} {verdict}")
    return rows


if __name__ == "__main__":
    main()
