"""Panacea (fine-tuning + post-fine-tuning): fine-tune against an adaptive harmful perturbation, then apply it.

Per step (protocol.md section 3), user batches x_u and provider harmful batches x_h:
    Gg = ∇g(w; x_u);  Gh = ∇h(w; x_h);  ε = ρ Gh/‖Gh‖ (one global norm)
    Ghe = ∇ min(h(w + ε; x_h), clamp)   at the perturbed point, w restored bit-exactly afterwards
    update = Gg − λ (Ghe − Gh)
After fine-tuning the ε of the last step is added to the adapter once, saved as epsilon.safetensors,
and its norm per decoder layer is reported (the paper's layer-wise "safety affinity" analysis).

The protocol's fine-tuning lr is 2e-5: it is the fine-tuning stage's lr, set it with
``--set finetune.lr=2e-5``. Gradient accumulation is exact: every gradient is a token mean over all
micro-batches (loss_gradient), and the clamp acts on that whole-step mean.
"""

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from harmbench_ft import Defense, PostContext, Stage, StepContext, StepResult, UsageError, global_norm, hookimpl, loss_gradient, perturbed

EPSILON_FILE = "epsilon.safetensors"
LAYER_INDEX = re.compile(r"\.(\d+)\.")  # the first integer component of a name is its decoder layer (model.layers.3., transformer.h.3.)


@dataclass
class Params:
    # ρ, the global norm of the harmful perturbation ε: protocol.md section 3 (w-yibo/Panacea default).
    rho: float = 1.0
    # λ, weight of the perturbation term −λ (Ghe − Gh): protocol.md section 3.
    lam: float = 1e-3
    # The perturbed harmful loss is clamped at this value (its gradient is zero above it): protocol.md section 3.
    clamp: float = 5.0

    def validate(self) -> None:
        for name, low, strict in (("rho", 0.0, False), ("lam", 0.0, False), ("clamp", 0.0, True)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low if strict else value >= low)):
                bound = "> 0" if strict else ">= 0"
                raise UsageError(f"panacea: {name}={value} is out of range; it must be a finite number {bound} (default {getattr(Params(), name)})")


def layer_of(name: str) -> str:
    match = LAYER_INDEX.search(name)
    return match.group(1) if match else "other"


class Panacea(Defense):
    name = "panacea"
    description = "Fine-tune with an adaptive harmful perturbation (Wang et al. 2025): Gg − λ(Ghe − Gh), then add the last ε to the adapter once; 3x SFT cost."
    stages = (Stage.FINETUNE, Stage.POST_FINETUNE)
    needs = ("harmful",)
    Params = Params

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.epsilon: dict[str, torch.Tensor] = {}  # parameter name -> ε of the last step

    def step(self, ctx: StepContext, batches: list) -> StepResult:
        rho, lam, clamp = self.params.rho, self.params.lam, self.params.clamp
        harmful = ctx.batches("harmful")

        loss, gg = loss_gradient(ctx.model, ctx.params, batches)
        h, gh = loss_gradient(ctx.model, ctx.params, harmful)
        norm = global_norm(gh) + 1e-7  # once: +1e-7 so that a zero gradient gives ε = 0, not NaN
        eps = [rho * g / norm for g in gh]

        # min(h, clamp) is flat above the clamp, so its gradient there is zero (torch.clamp keeps it at equality).
        with perturbed(ctx.params, eps):
            h_eps, ghe = loss_gradient(ctx.model, ctx.params, harmful)
        clamped = h_eps > clamp
        if clamped:
            ghe = [torch.zeros_like(g) for g in ghe]

        self.epsilon = {n: e.detach().clone() for n, e in zip(ctx.param_names, eps, strict=True)}
        grads = [a - lam * (b - c) for a, b, c in zip(gg, ghe, gh)]
        return StepResult(loss, grads, {"harmful_loss": h, "perturbed_harmful_loss": h_eps, "clamped": float(clamped)})

    def post_finetune(self, ctx: PostContext) -> dict[str, Any]:
        """Add the last step's ε to the fine-tuned adapter, once; save it and report its norm per layer."""
        from safetensors.torch import save_file

        if not self.epsilon:
            raise UsageError("panacea: no ε to apply; the fine-tuning stage saved none (its artifact lacks defense_state.safetensors); delete the fine-tuning artifact and rerun")
        mismatch = sorted(set(ctx.param_names) ^ set(self.epsilon))
        if mismatch:
            raise UsageError(f"panacea: ε and the fine-tuned adapter name different tensors, e.g. {mismatch[:3]}; delete the fine-tuning artifact and rerun")
        with torch.no_grad():
            for name, p in zip(ctx.param_names, ctx.params, strict=True):
                p.add_(self.epsilon[name].to(device=p.device, dtype=p.dtype))
        save_file({n: e.detach().contiguous().cpu() for n, e in self.epsilon.items()}, str(ctx.artifact_dir / EPSILON_FILE))

        by_layer: dict[str, list[torch.Tensor]] = {}
        for name in ctx.param_names:
            by_layer.setdefault(layer_of(name), []).append(self.epsilon[name])
        order = sorted(by_layer, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
        return {
            "epsilon_file": EPSILON_FILE,
            "epsilon_norm": float(global_norm(list(self.epsilon.values()))),
            "layer_norms": {k: float(global_norm(by_layer[k])) for k in order},
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.epsilon)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.epsilon = {n: t.clone() for n, t in state.items()}


@hookimpl
def hft_register_defenses(register):
    register(Panacea)
