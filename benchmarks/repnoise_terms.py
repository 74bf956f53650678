"""Where a RepNoise step's time goes, term by term, as ratios to an SFT step on the same rows.

The cost benchmark (defense_cost.py) feeds every defense one short batch; a real RepNoise step at the
cpu preset costs far more than its ratio there. This splits one step on the preset's own rows (the first
--batch-size provider harmful rows x_h and their safe answers x_s, up to --max-length tokens) into:

- sft:     forward + backward of the response loss on x_s (= RepNoise's retain term, and the baseline);
- harmful: forward + backward of x_h with every hidden state and MLP output kept, final-logit loss only;
- lens:    the L logit-lens terms lm_head(norm(h_l)) at the response tokens, forward + backward, on the
           hidden states of x_h taken as leaves (so the decoder is not counted twice);
- mmd:     the L per-layer MMD terms (checkpointed, as the plugin runs them) on the MLP outputs, likewise;
- step:    the plugin's whole step, to check the parts add up.

    python benchmarks/repnoise_terms.py --data-dir ../shared/data
    python benchmarks/repnoise_terms.py --model tiny-llama --repeats 1      # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from hft_bench_plugins.defenses import repnoise
from harmbench_ft import layers, lm_loss_sum, response_tokens
from harmbench_ft.data.formatting import collate, tokenize_example
from harmbench_ft.data.windows import build_run_data
from harmbench_ft.defense import Stage, StepContext
from harmbench_ft.models.loading import add_lora, load_base
from harmbench_ft.plugins import get_registry
from harmbench_ft.spec import ModelSpec, apply_overrides, preset


class Fixed:
    def __init__(self, batches):
        self.batches = batches

    def next_step(self):
        return self.batches


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (cpu preset: 8)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row (cpu preset alignment: 256)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--terms", default="sft,harmful,lens,mmd,step", help="which to time (step needs the most memory)")
    args = parser.parse_args(argv)

    spec = apply_overrides(preset("cpu"), {"model.name": args.model})
    data = build_run_data(spec, get_registry().get("tasks", "sst2"), args.data_dir)
    model, tokenizer = load_base(ModelSpec(args.model))
    torch.manual_seed(0)
    model = add_lora(model, spec.alignment.train)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def batch(examples):
        return collate([tokenize_example(tokenizer, e, args.max_length) for e in examples[: args.batch_size]], tokenizer.pad_token_id)

    x_s, x_h = batch(data.harmful_refusals), batch(data.harmful)
    mlps, norm, head = layers.mlp_modules(model), layers.final_norm(model), layers.lm_head(model)
    predicts = x_h["labels"][:, 1:] != -100
    targets = x_h["labels"][:, 1:][predicts]
    tokens = x_h["labels"] != -100

    def zero():
        for p in params:
            p.grad = None

    def sft():
        zero()
        (lm_loss_sum(model, x_s) / response_tokens(x_s)).backward()

    def harmful_forward():
        with repnoise.captured_outputs(mlps) as mlp_outputs:
            out = model(input_ids=x_h["input_ids"], attention_mask=x_h["attention_mask"], output_hidden_states=True)
        return out, mlp_outputs

    def harmful():
        zero()
        out, _ = harmful_forward()
        repnoise.mean_response_ce(out.logits[:, :-1][predicts], targets).backward()

    with torch.no_grad():
        out, mlp_outputs = harmful_forward()
    hidden = [h.detach().requires_grad_() for h in out.hidden_states[:-1]]
    mlp_leaves = [h.detach().requires_grad_() for h in mlp_outputs]
    del out, mlp_outputs

    def lens():
        sum(repnoise.lens_ce(head, norm(h[:, :-1][predicts]), targets) for h in hidden).backward()

    def mmd():
        generator = torch.Generator().manual_seed(0)
        n = int(tokens.sum())
        terms = [checkpoint(repnoise.mmd, h[tokens], torch.randn(n, h.shape[-1], generator=generator), use_reentrant=False) for h in mlp_leaves]
        torch.stack(terms).mean().backward()

    defense = repnoise.RepNoise()
    streams = {"harmful": Fixed([x_h]), "harmful_refusals": Fixed([x_s])}

    def step():
        defense.step(StepContext(model, params, names, Stage.ALIGNMENT, 0, 1, "harmful_refusals", streams), [x_s])

    timers = {"sft": sft, "harmful": harmful, "lens": lens, "mmd": mmd, "step": step}
    seconds = {name: timed(timers[name], args.repeats) for name in ["sft", *(t for t in args.terms.split(",") if t != "sft")]}
    n_layers = len(mlps)
    print(f"model {args.model}, {torch.get_num_threads()} threads, batch {args.batch_size} rows <= {args.max_length} tokens, median of {args.repeats}")
    print(f"x_h: {x_h['input_ids'].numel()} tokens ({int(tokens.sum())} response); x_s: {x_s['input_ids'].numel()} tokens ({response_tokens(x_s)} response); {n_layers} layers")
    print(f"{'term':10} {'s':>8} {'x SFT':>7}")
    for name, s in seconds.items():
        print(f"{name:10} {s:8.3f} {s / seconds['sft']:7.2f}")
    if {"harmful", "lens", "mmd"} <= seconds.keys():
        parts = seconds["sft"] + seconds["harmful"] + seconds["lens"] + seconds["mmd"]
        print(f"{'sum':10} {parts:8.3f} {parts / seconds['sft']:7.2f}   (sft + harmful + lens + mmd; compare with step)")
    return seconds


if __name__ == "__main__":
    main()
