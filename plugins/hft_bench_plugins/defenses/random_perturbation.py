"""Random perturbation (post-fine-tuning): add Gaussian noise to the fine-tuned adapter once, w ← w + ξ.

The control for Panacea's final perturbation (protocol.md section 3): the same edit with a random direction.
In "norm" mode ξ is rescaled to one global norm ρ (Panacea's ρ), so the two differ only in direction.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from harmbench_ft import Defense, PostContext, Stage, UsageError, global_norm, hookimpl

MODES = ("sigma", "norm")


@dataclass
class Params:
    # "sigma": ξ ~ N(0, σ² I) element-wise; "norm": the same draw rescaled to ‖ξ‖ = ρ. protocol.md section 3
    # offers both; "sigma" is its definition of the method, so it is the default.
    mode: str = "sigma"
    # Element-wise std. protocol.md gives no value, so this is ours: on the suite's default adapter
    # (cpu preset, SmolLM2-135M, LoRA r=32 on all 7 projections, ~9.8M entries) σ=3e-4 gives
    # ‖ξ‖ ≈ σ·√N ≈ 0.94, about Panacea's ρ=1, so the default is comparable to Panacea out of the box.
    sigma: float = 3e-4
    # Global norm of ξ in "norm" mode: Panacea's ρ=1 (protocol.md section 3), so the two are comparable.
    rho: float = 1.0
    # Seed of the noise generator, used alone (not mixed with the run seed) so a draw is reproducible.
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"random-perturbation: mode={self.mode!r} is not a mode; choose one of: {', '.join(MODES)} (e.g. --defense-arg mode=norm)")
        for name in ("sigma", "rho"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"random-perturbation: {name}={value} is out of range; it must be a finite number >= 0 (default {getattr(Params(), name)})")


class RandomPerturbation(Defense):
    name = "random-perturbation"
    description = "Add seeded Gaussian noise to the fine-tuned adapter once: element-wise std sigma, or rescaled to global norm rho (Panacea's rho); no training cost."
    stages = (Stage.POST_FINETUNE,)
    Params = Params

    def noise(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """ξ for these tensors, drawn in their order on the CPU so a seed gives the same noise on any device."""
        generator = torch.Generator(device="cpu").manual_seed(self.params.seed)
        xi = [torch.randn(p.shape, generator=generator, dtype=torch.float32) for p in params]
        if self.params.mode == "norm":
            scale = self.params.rho / global_norm(xi)
            return [x * scale for x in xi]
        return [x * self.params.sigma for x in xi]

    def post_finetune(self, ctx: PostContext) -> dict[str, Any]:
        xi = self.noise(ctx.params)
        with torch.no_grad():
            for p, x in zip(ctx.params, xi, strict=True):
                p.add_(x.to(device=p.device, dtype=p.dtype))
        scale = {"sigma": self.params.sigma} if self.params.mode == "sigma" else {"rho": self.params.rho}
        return {"mode": self.params.mode, **scale, "seed": self.params.seed, "noise_norm": float(global_norm(xi)), "n_elements": sum(x.numel() for x in xi)}


@hookimpl
def hft_register_defenses(register):
    register(RandomPerturbation)
