"""Booster (alignment stage): align while making a harmful step less effective at lowering the harmful loss.

Objective ``min_w f(w) + λ [h(w) − h(w − α ∇h(w)/‖∇h(w)‖)]`` (protocol.md section 3), optimised first
order: three forward/backward passes per step, and no gradient through the perturbation's dependence on w.
"""

import math
from dataclasses import dataclass

from harmbench_ft import Defense, Stage, StepContext, StepResult, UsageError, global_norm, hookimpl, loss_gradient, perturbed


@dataclass
class Params:
    # λ, weight of the harmful-loss-reduction term: protocol.md section 3; git-disl/Booster
    # script/alignment/smooth_align.sh: lamb=5.
    lamb: float = 5.0
    # α, length of the simulated harmful step: protocol.md section 3; smooth_align.sh: alpha=0.1.
    alpha: float = 0.1

    def validate(self) -> None:
        for name in ("lamb", "alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"booster: {name}={value} is out of range; it must be a finite number >= 0 (default {getattr(Params(), name)})")


class Booster(Defense):
    name = "booster"
    description = "Alignment that blunts a simulated harmful step (Huang et al. 2024): grad f + λ (grad h(w) − grad h(w')); 3x SFT cost."
    stages = (Stage.ALIGNMENT,)
    needs = ("harmful",)
    Params = Params

    def step(self, ctx: StepContext, batches: list) -> StepResult:
        lamb, alpha = self.params.lamb, self.params.alpha
        harmful = ctx.batches("harmful")  # as many rows as the alignment batch: its stream uses the same TrainConfig

        # G1 = ∇h(w), normalised by one global norm over all trainable tensors (+1e-7 so a zero gradient is safe).
        h, g1 = loss_gradient(ctx.model, ctx.params, harmful)
        norm = global_norm(g1) + 1e-7

        # G2 = ∇h(w') at w' = w − α G1/N, same harmful batches. perturbed() restores w from a saved copy:
        # adding the step back would leave rounding error that drifts the weights over training.
        with perturbed(ctx.params, [-alpha * g / norm for g in g1]):
            h_perturbed, g2 = loss_gradient(ctx.model, ctx.params, harmful)

        # Ga = ∇f(w) on the alignment batches, at the restored weights.
        loss, ga = loss_gradient(ctx.model, ctx.params, batches)
        grads = [a + lamb * (b - c) for a, b, c in zip(ga, g1, g2)]
        return StepResult(loss, grads, {"harmful_loss": h, "perturbed_harmful_loss": h_perturbed})


@hookimpl
def hft_register_defenses(register):
    register(Booster)
