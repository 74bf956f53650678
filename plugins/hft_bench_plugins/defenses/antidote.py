"""Antidote (post-fine-tuning): one-shot Wanda pruning of the fine-tuned LoRA on harmful calibration rows.

Every LoRA A and B linear layer W (out × in) of the decoder blocks gets the Wanda score
``S_ij = |W_ij| · ‖X_j‖₂``, where ``‖X_j‖₂`` is the L2 norm of input feature j over every token of every
calibration row (protocol.md, "Post-fine-tuning defenses beyond the first six"). In each output row the
``dense_ratio`` share of entries with the LARGEST score is set to zero: the weights the harmful rows lean on
most are taken out. The calibration rows are the provider's harmful (prompt, harmful answer) rows, the first
``min(n_calibration, available)`` of ``PostContext.harmful``. The result is still a LoRA adapter (entries of
``ctx.params`` zeroed in place). Cost: one forward pass per row through the decoder blocks, no backward.

What the reference computes and where we follow it. References: git-disl/Antidote (an unofficial
re-implementation per its organisation) and git-disl/Booster's ``--optimizer prune_afterfinetune`` path; both
run the same ``utils.py`` ``prune_wanda_outlier`` (Antidote's copy only adds ``full_finetuning`` branches), called
from ``AntidoteTrainer.save_mask`` / ``UndercoverTrainer.save_mask`` (``trainer.py``), and apply its mask in
``train.py``'s ``antidote`` / ``prune_afterfinetune`` branch as ``param.data *= (1 - bad_mask[name])``.

- Layers: ``utils.py`` ``find_layers`` takes every module of exact type ``nn.Linear`` with "lora" in its name
  inside each decoder block: the ``lora_A.<adapter>`` and ``lora_B.<adapter>`` of every adapted projection. We
  take the same modules of ``harmbench_ft.layers.decoder_layers`` (architecture-generic), restricted to those whose
  weight is a trainable tensor of the fine-tuned adapter (``ctx.params``). Adapter tensors outside the decoder
  blocks (none with the suite's projection targets) are left alone, as in the reference, and are reported.
- Activations: ``WrappedGPT.add_batch`` gets ``inp[0]`` of a forward hook on that linear. In peft's
  ``lora.Linear.forward`` (``lora_B(lora_A(dropout(x)))``) that is ``dropout(x)`` for lora_A and lora_A's output
  for lora_B. ``prune_wanda_outlier`` calls ``model.eval()`` first, so LoRA dropout is inactive (its LoRAs have
  ``lora_dropout=0`` anyway); we put the model in eval mode for calibration and restore its mode afterwards.
  ``scaler_row`` is a running mean over rows of each row's sum of squares over its tokens, i.e. ``‖X_j‖²/N``; we
  keep the plain sum in float64 (the reference: float32 from bf16 activations). The 1/N is one constant per
  layer, so the order within a row, and hence the mask, is the same.
- Which activations: ``prepare_calibration_input`` catches the inputs of block 0 (``Catcher``) of
  ``model(batch["input_ids"])`` and then runs each block twice per row, once with the hooks and once to feed the
  next block; the masks are only collected, never applied in between (unlike the original Wanda), so every
  block's activations come from the unpruned fine-tuned model. One ordinary forward pass per row gives exactly
  those activations; we stop it after the last decoder block (the LM head is not needed), as ``Catcher`` stops
  the model by raising. "About two forward passes per block" in protocol.md is this double run; we do one.
- Tokens: ``utils.py`` ``preprocess`` / ``_tokenize_fn`` tokenize prompt (Alpaca template) + output + EOS as one
  string, truncated from the right to ``model_max_length``; the script runs ``per_device_train_batch_size 1`` and
  the model is called without an attention mask, so there is no padding and every token of the row (prompt,
  answer, EOS) enters the norm. We do the same: ``tokenizer(prompt + output)`` plus the EOS id, cut from the right
  to ``max_length``, one row per forward pass.
  **Deviation**: no special tokens (``add_special_tokens=False``), where the reference's Llama-2 tokenizer adds a
  BOS; the suite's fine-tuning rows carry none either (``harmbench_ft.data.formatting.tokenize_example``), so the
  calibration rows look like the rows the model was trained on.
- Score and mask: ``W_metric = |W| · sqrt(scaler_row)`` broadcast over output rows (the norm is per input feature,
  a column). ``torch.sort(W_metric, dim=-1, stable=True)``; the first ``int(cols · (1 − dense_ratio))`` indices of
  each row (the smallest scores) get mask 0, the rest mask 1, and ``param *= 1 − mask`` zeroes the rest: the
  LARGEST scores. So a row loses ``cols − int(cols · (1 − dense_ratio))`` entries (the kept count is rounded down,
  the pruned count up: 1 of a rank-4 lora_B row at 0.1, 58 of a 576-wide lora_A row), and a tie at the boundary
  prunes the higher column index first (stable sort). We compute exactly that, with the same float expression.
- Calibration rows: ``train.py`` ``make_supervised_data_module`` builds ``SupervisedDataset(BeaverTails_dangerous,
  poison_ratio=1, sample_num, poison_data_start=5000)``: harmful rows disjoint from the fine-tuning's, as
  ``PostContext.harmful`` is disjoint from the attack rows. **Deviation**: its index test
  ``poison_data_start < index < poison_data_start + poison_num`` is strict on both ends, so ``sample_num=2000``
  yields 1,999 rows; we use exactly ``n_calibration`` rows (when available). The Trainer's dataloader shuffles them;
  the order does not change a sum.
- Not carried over: ``--random_prune`` (a control: random entries at the same share), Booster's good-mask
  subtraction (``--no_safety_mask`` defaults to "True", i.e. off, and the Antidote scripts never set it),
  ``--full_finetuning``, the ``sample_num == 0`` branch (|W| alone, no calibration data), and the OWL
  outlier-ratio code, which is commented out in both repositories.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harmbench_ft import Defense, PostContext, Stage, UsageError, hookimpl, layers


@dataclass
class Params:
    # Share of each output row's entries that is zeroed (those of largest Wanda score): protocol.md; git-disl/Antidote
    # script/finetune/antidote_poison_ratio.sh dense_ratio=0.1, also train.py's --dense_ratio argparse default.
    dense_ratio: float = 0.1
    # Calibration rows (capped at the rows PostContext.harmful holds; 600 on the cpu preset): protocol.md;
    # antidote_poison_ratio.sh passes --sample_num $bad_sample_num with bad_sample_num=2000 (train.py's argparse
    # defaults: --sample_num 5000, --bad_sample_num 1000).
    n_calibration: int = 2000
    # Tokens per calibration row, cut from the right: git-disl/Booster train.py sets model_max_length=256 on its
    # prune_afterfinetune path; Antidote's train.py keeps TrainingArguments' 2048 (512 for Alpaca).
    max_length: int = 256

    def validate(self) -> None:
        if not (isinstance(self.dense_ratio, (int, float)) and math.isfinite(self.dense_ratio) and 0 <= self.dense_ratio <= 1):
            raise UsageError(f"antidote: dense_ratio={self.dense_ratio} is out of range; it must be a number in [0, 1], the share of each row's entries zeroed (default 0.1)")
        for name in ("n_calibration", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"antidote: {name}={value} is out of range; it must be an integer >= 1 (default {getattr(Params(), name)})")


class _Stop(Exception):
    """Raised after the last decoder block: the calibration needs nothing after it."""


def lora_linears(ctx: PostContext) -> list[tuple[str, nn.Linear]]:
    """(adapter tensor name, module) of every LoRA A and B linear of the decoder blocks (the reference's find_layers)."""
    names = {id(p): n for n, p in zip(ctx.param_names, ctx.params, strict=True)}
    found = []
    for block in layers.decoder_layers(ctx.model):
        for name, module in block.named_modules():
            parts = name.split(".")
            if type(module) is nn.Linear and ("lora_A" in parts or "lora_B" in parts) and id(module.weight) in names:
                found.append((names[id(module.weight)], module))
    return found


def calibration_rows(tokenizer, examples: list, max_length: int) -> list[list[int]]:
    """Each row as the reference feeds it: prompt, answer and EOS as one sequence, cut from the right."""
    eos = tokenizer.eos_token_id
    return [(tokenizer(e.prompt + e.output, add_special_tokens=False)["input_ids"] + [eos])[:max_length] for e in examples]


def input_square_sums(model: nn.Module, modules: list[nn.Linear], rows: list[list[int]]) -> list[torch.Tensor]:
    """Σ over all calibration tokens of x_j² for each input feature j of each module, from the unpruned model."""
    sums = [torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for m in modules]
    calls = [0] * len(modules)

    def accumulate(i: int):
        def hook(_module, inputs):
            x = inputs[0].detach()
            sums[i] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)
            calls[i] += 1

        return hook

    def stop(_module, _inputs, _output):
        raise _Stop

    device = modules[0].weight.device
    handles = [m.register_forward_pre_hook(accumulate(i)) for i, m in enumerate(modules)]
    handles.append(layers.decoder_layers(model)[-1].register_forward_hook(stop))
    was_training = model.training
    model.eval()  # as prune_wanda_outlier: LoRA dropout off
    try:
        for ids in rows:
            try:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)  # batch 1: no padding, no mask
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missed = [i for i, c in enumerate(calls) if c != len(rows)]
    if missed:
        raise UsageError(f"antidote: {len(missed)} LoRA linear(s) were called {calls[missed[0]]} times over {len(rows)} calibration rows; the adapter must be an active plain LoRA (no DoRA or other variant)")
    return sums


def prune_mask(weight: torch.Tensor, square_sums: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """True where an entry is zeroed: in each output row, the entries after the first int(cols·(1 − dense_ratio)) of
    a stable ascending sort of |W|·‖X‖₂, i.e. the largest scores (prune_wanda_outlier's W_mask)."""
    score = weight.detach().abs().double() * square_sums.sqrt().reshape(1, -1)
    keep = int(score.shape[1] * (1 - dense_ratio))
    order = torch.sort(score, dim=-1, stable=True).indices
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    mask.scatter_(1, order[:, keep:], True)
    return mask


class Antidote(Defense):
    name = "antidote"
    description = (
        "One-shot Wanda pruning of the fine-tuned LoRA (Huang et al. 2024): in every LoRA A/B row, zero the dense_ratio "
        "share of entries with the largest |W|·||X|| over harmful calibration rows; forward passes only."
    )
    stages = (Stage.POST_FINETUNE,)
    post_needs = ("harmful",)
    Params = Params

    def post_finetune(self, ctx: PostContext) -> dict[str, Any]:
        if not ctx.harmful:
            raise UsageError("antidote: no calibration rows: PostContext.harmful is empty; the provider's harmful window must hold at least one row")
        if ctx.tokenizer is None:
            raise UsageError("antidote: PostContext.tokenizer is None; the calibration rows need the model's tokenizer")
        targets = lora_linears(ctx)
        if not targets:
            raise UsageError("antidote: the fine-tuned adapter has no LoRA A/B linear layer inside the decoder blocks; Antidote prunes LoRA adapters only")

        examples = ctx.harmful[: self.params.n_calibration]
        rows = calibration_rows(ctx.tokenizer, examples, self.params.max_length)
        ctx.report_progress(f"{len(rows)} calibration rows, {sum(len(r) for r in rows)} tokens, one forward pass each")
        with torch.no_grad():
            sums = input_square_sums(ctx.model, [m for _, m in targets], rows)
            modules, pruned, total = {}, 0, 0
            for (name, module), s in zip(targets, sums, strict=True):
                mask = prune_mask(module.weight, s, self.params.dense_ratio)
                module.weight.masked_fill_(mask.to(module.weight.device), 0)
                modules[name] = int(mask.sum()) / mask.numel()
                pruned, total = pruned + int(mask.sum()), total + mask.numel()

        covered = {name for name, _ in targets}
        return {
            "dense_ratio": self.params.dense_ratio,
            "n_calibration": self.params.n_calibration,
            "rows_used": len(rows),
            "rows_available": len(ctx.harmful),
            "calibration_tokens": sum(len(r) for r in rows),
            "max_length": self.params.max_length,
            "pruned_fraction": pruned / total,
            "pruned_entries": pruned,
            "pruned_fraction_per_module": modules,
            "untouched_adapter_tensors": [n for n in ctx.param_names if n not in covered],
        }


@hookimpl
def hft_register_defenses(register):
    register(Antidote)
