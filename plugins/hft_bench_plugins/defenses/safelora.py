"""SafeLoRA (post-fine-tuning): project the fine-tuned LoRA update onto the alignment subspace, module by module.

Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large Language Models",
NeurIPS 2024; reference code IBM/SafeLoRA (`model.py` class SafeLoRA, `config.py` SafeLoRAConfig), protocol.md
"Post-fine-tuning defenses beyond the first six". For every linear module the fine-tuned adapter adapts, with
its update ΔW = s·B·A (s = α/r, PEFT's scaling):
    V  = W_aligned − W_unaligned              (ctx.aligned_weights() − ctx.base_weights(), that module's weight)
    C  = V Vᵀ / ‖V‖_F                         (d_out × d_out)
    B' = C · B                                (A unchanged, so ΔW' = C · ΔW)
    cos = cos(flat(B'A), flat(BA)), rounded to 5 decimals
and B is replaced by B' where cos ≤ τ. No data, no training: one d_out × d_in × d_out product per module. The
result is still a LoRA adapter: the lora_B tensors of ctx.params are edited in place.

Choices, each checked against the reference:
- Normalisation: `get_aligned_matrix` computes `torch.mm(vec, vec.t()) / torch.norm(vec)`; torch.norm of a matrix
  is the Frobenius norm, not squared, so C is V Vᵀ/‖V‖_F as the paper writes it (not the orthogonal projector
  V(VᵀV)⁺Vᵀ, nor V Vᵀ/‖V‖_F²). We follow it. The scale of C does not change cos, only B'.
- Side: `projected_weighted` sets the B parameter (the one whose shape[0] ≠ r) to `torch.mm(P, B)` and never touches
  A; it measures `cos(P·B·A, B·A)` on the flattened products. Same here. (The reference names its A copy "B".)
- Module pairing: the reference zips the base and aligned models' `named_parameters()`, keeps those whose name
  contains a target-module string, and pairs the i-th such V with the i-th lora_B of the PEFT model by list
  order. **Deviation (protocol.md)**: we pair by name: the LoRA layer `model.layers.3.self_attn.q_proj` gets V
  from the key `model.layers.3.self_attn.q_proj.weight` of the two state dicts, whatever their order. This also
  drops the reference's substring filter, which on Qwen2 would take the q/k/v biases too (and fail on them).
- Which tensors: LoRA layers are found as modules with `lora_A`/`lora_B` ModuleDicts whose weights are in
  ctx.params (by identity), not by the reference's `param.shape[0] == r` test, which misreads a module with
  d_out = r. Every tensor of ctx.params must be such an A or B, else UsageError (nothing is silently left out).
- LoRA scaling α/r: left out, as in the reference, and it does not matter: cos is invariant to s > 0, and
  s·(C·B)·A = C·(s·B·A), so B' = C·B projects the effective update exactly. DoRA adapters are refused (their
  update is not s·B·A).
- Rounding: the reference compares `numpy.round(cos, 5)` with τ; so do we (it matters only within 5e-6 of τ), and
  the report gives the rounded values. The cosine is torch's `cosine_similarity`, as in the reference.
- Number mode: the reference runs `projected_weighted` once with τ=0.3 to collect every module's cos, takes
  `numpy.sort(cos)[:num_proj_layers][-1]` as τ and reruns with it, so the N lowest are projected and ties at the
  N-th value are projected too. Same here in one pass (every result depends only on the unedited adapter, as in
  the reference's second pass, which recomputes from its deep copy). N above the module count projects all.
- A module the alignment left unchanged (V = 0) has no alignment subspace: the reference's C is then 0/0 = NaN, its
  cos NaN, never ≤ τ and sorted last, so it is never projected. We keep that outcome explicitly: its cos is reported
  as None and it is left out of number mode's ranking. **Deviation**: where N exceeds the modules with a cos, the
  reference's τ would be NaN and nothing would be projected; we project all that have one.
- Default mode "threshold" (τ=0.5): protocol.md names it first with τ=0.5; **the reference's config.py defaults to
  select_layers_type="number"** (num_proj_layers=10). Choose it with `--defense-arg mode=number`.
- Numerics: V, C and B' in float32 on the adapter's device (the reference builds V in float32 on `config.devices`),
  B' cast back to B's dtype. The reference's "Pdst" (mean of 1/(1 + ‖B_final − C·B‖) over modules, "> 0.8 is
  better") is reported as `pdst`, over the modules that have a C.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from torch import nn

from harmbench_ft import Defense, PostContext, Stage, UsageError, hookimpl

MODES = ("threshold", "number")


@dataclass
class Params:
    # "threshold": project where cos ≤ τ; "number": project the num_proj_layers modules of lowest cos. protocol.md
    # lists threshold first (τ = 0.5); IBM/SafeLoRA config.py defaults to "number" (see the module docstring).
    mode: str = "threshold"
    # τ: IBM/SafeLoRA config.py SafeLoRAConfig.threshold = 0.5; protocol.md τ = 0.5.
    threshold: float = 0.5
    # N, the number of adapted modules (one per lora_B: the reference's "layers") projected in "number" mode:
    # IBM/SafeLoRA config.py SafeLoRAConfig.num_proj_layers = 10; protocol.md "the 10 modules of lowest similarity".
    num_proj_layers: int = 10

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"safelora: mode={self.mode!r} is not a mode; choose one of: {', '.join(MODES)} (default {Params().mode!r}, e.g. --defense-arg mode=number)")
        if not (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool) and math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0):
            raise UsageError(f"safelora: threshold={self.threshold} is out of range; it is a cosine similarity, a number in [-1, 1] (default {Params().threshold})")
        if not (isinstance(self.num_proj_layers, int) and not isinstance(self.num_proj_layers, bool) and self.num_proj_layers >= 1):
            raise UsageError(f"safelora: num_proj_layers={self.num_proj_layers} is out of range; it must be an integer >= 1 (default {Params().num_proj_layers})")


@dataclass
class Module:
    """One adapted linear module: its plain name (the state-dict key less '.weight') and its LoRA tensors."""

    name: str
    layer: nn.Module
    A: torch.Tensor  # r × d_in
    B: torch.Tensor  # d_out × r, edited in place


def lora_modules(ctx: PostContext) -> list[Module]:
    """The linear modules whose LoRA A and B are the adapter's tensors, named as in the plain model's state dict."""
    plain = ctx.model.get_base_model() if hasattr(ctx.model, "get_base_model") else ctx.model
    owned = {id(p) for p in ctx.params}
    found, covered = [], set()
    for name, layer in plain.named_modules():
        lora_A, lora_B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        if not (isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict)):
            continue
        for adapter, a in lora_A.items():
            A, B = a.weight, lora_B[adapter].weight
            if id(A) not in owned and id(B) not in owned:
                continue
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise UsageError(f"safelora: {name} is a DoRA adapter; SafeLoRA projects plain LoRA updates s·B·A only")
            found.append(Module(name, layer, A, B))
            covered |= {id(A), id(B)}
    stray = [n for n, p in zip(ctx.param_names, ctx.params, strict=True) if id(p) not in covered]
    if stray:
        raise UsageError(f"safelora: the adapter has tensors that are not LoRA A/B matrices of linear modules, e.g. {stray[:3]}; SafeLoRA projects LoRA updates of linear layers only")
    if not found:
        raise UsageError("safelora: the fine-tuned model has no LoRA layers holding the adapter's tensors; SafeLoRA edits a LoRA adapter")
    return found


def alignment_matrix(aligned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], m: Module) -> torch.Tensor | None:
    """C = V Vᵀ / ‖V‖_F of this module (reference get_aligned_matrix), V matched by name; None where V = 0."""
    key = f"{m.name}.weight"
    if key not in aligned or key not in base:
        raise UsageError(f"safelora: no weight {key!r} in the aligned or base weights for the LoRA module {m.name}; the adapter must sit on the same architecture")
    V = aligned[key].to(device=m.B.device, dtype=torch.float32) - base[key].to(device=m.B.device, dtype=torch.float32)
    if getattr(m.layer, "fan_in_fan_out", False):  # Conv1D-style weights are stored d_in × d_out
        V = V.T
    if V.shape != (m.B.shape[0], m.A.shape[1]):
        raise UsageError(f"safelora: {key} has shape {tuple(V.shape)} but its LoRA update is {m.B.shape[0]} × {m.A.shape[1]}")
    norm = torch.norm(V)
    if norm == 0:
        return None
    return torch.mm(V, V.t()) / norm


class SafeLoRA(Defense):
    name = "safelora"
    description = "Project the fine-tuned LoRA's B onto the alignment subspace C = V Vᵀ/‖V‖ (V = aligned − base) in the modules whose update it changes most (cos ≤ τ, or the N lowest) (Hsu et al. 2024); no data, no training."
    stages = (Stage.POST_FINETUNE,)
    Params = Params

    def post_finetune(self, ctx: PostContext) -> dict[str, Any]:
        modules = lora_modules(ctx)
        aligned, base = ctx.aligned_weights(), ctx.base_weights()
        # One pass: each module's cos and candidate B', both from the unedited adapter (the reference's first pass).
        cos: dict[str, float | None] = {}
        projected_B: dict[str, torch.Tensor] = {}
        for m in modules:
            C = alignment_matrix(aligned, base, m)
            if C is None:
                cos[m.name] = None
                continue
            B = m.B.detach().to(torch.float32)
            A = m.A.detach().to(torch.float32)
            new_B = torch.mm(C, B)
            sim = torch.nn.functional.cosine_similarity(torch.mm(new_B, A).reshape(1, -1), torch.mm(B, A).reshape(1, -1)).item()
            cos[m.name] = float(numpy.round(sim, 5))
            projected_B[m.name] = new_B
        del aligned, base

        ranked = sorted(c for c in cos.values() if c is not None)
        if self.params.mode == "threshold":
            tau = self.params.threshold
        else:
            tau = ranked[: self.params.num_proj_layers][-1] if ranked else None
        chosen = [m for m in modules if cos[m.name] is not None and tau is not None and cos[m.name] <= tau]

        with torch.no_grad():
            for m in chosen:
                m.B.copy_(projected_B[m.name].to(m.B.dtype))
        # The reference's Pdst: 1 for a projected module, 1/(1 + ‖B − C·B‖) for one left as it was.
        pdst = [1.0 / (1.0 + float(torch.norm(m.B.detach().float() - projected_B[m.name]))) for m in modules if m.name in projected_B]
        report: dict[str, Any] = {"mode": self.params.mode, "threshold": tau}
        if self.params.mode == "number":
            report["num_proj_layers"] = self.params.num_proj_layers
        return {
            **report,
            "n_modules": len(modules),
            "n_projected": len(chosen),
            "projected": [m.name for m in chosen],
            "no_alignment_delta": [n for n, c in cos.items() if c is None],
            "similarities": cos,
            "pdst": float(numpy.mean(pdst)) if pdst else None,
        }


@hookimpl
def hft_register_defenses(register):
    register(SafeLoRA)
