"""Lisa (fine-tuning stage): bi-state optimisation of one adapter, alternating alignment and user steps.

Blocks of K_align alignment steps and K_ft user steps alternate, starting with alignment. Each state adds a
proximal term ``(ρ/2) ‖w − w_anchor‖²`` that pulls it towards the weights where the other state ended, so the
two states drift apart slowly (protocol.md section 3). The proximal gradient is added in closed form,
``ρ (w − w_anchor)``: no extra forward or backward pass, ~1x SFT per step.
"""

import math
from dataclasses import dataclass

import torch

from harmbench_ft import Defense, Stage, StepContext, StepResult, UsageError, global_norm, hookimpl, loss_gradient


@dataclass
class Params:
    # ρ, weight of the proximal term: protocol.md section 3 and the Lisa paper: ρ=1. The Booster repo's Lisa
    # scripts (git-disl/Booster script/finetune/lisa_poison_ratio.sh) use ρ=0.01. ρ=0 turns the term off.
    rho: float = 1.0
    # Alignment steps per block: protocol.md section 3, Lisa paper: K_align=100.
    k_align: int = 100
    # User steps per block: protocol.md section 3, Lisa paper: K_ft=900.
    k_ft: int = 900
    # No proximal term while step <= warmup_fraction * total steps (the whole schedule, alignment steps included):
    # protocol.md section 3; git-disl/Lisa trainer.py adds it only when `steps > 0.1 * T` (it hurt GSM8K convergence).
    warmup_fraction: float = 0.1

    def validate(self) -> None:
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise UsageError(f"lisa: rho={self.rho} is out of range; it must be a finite number >= 0 (default 1.0; 0 disables the proximal term)")
        if self.k_align < 1:
            raise UsageError(f"lisa: k_align={self.k_align} is out of range; it must be an integer >= 1 (default 100); for no alignment steps use --defense sft")
        if self.k_ft < 1:
            raise UsageError(f"lisa: k_ft={self.k_ft} is out of range; it must be an integer >= 1 (default 900)")
        if not 0 <= self.warmup_fraction <= 1:
            raise UsageError(f"lisa: warmup_fraction={self.warmup_fraction} is out of range; it must be in [0, 1] (default 0.1)")


class Lisa(Defense):
    name = "lisa"
    description = (
        "Bi-state fine-tuning (Huang et al. 2024): alternate k_align alignment and k_ft user steps, each state pulled "
        "towards where the other ended by (rho/2)||w - anchor||^2. ~1x SFT per step, but every started block of k_ft "
        "user steps adds k_align alignment steps: with the defaults (100/900) a 50-step fine-tune runs 150 steps (3x); "
        "lower k_align/k_ft for short runs."
    )
    stages = (Stage.FINETUNE,)
    needs = ("alignment",)
    Params = Params

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.state: str | None = None  # the source of the previous step: "alignment" or "user"
        self.anchor: list[torch.Tensor] | None = None  # where the other state ended; the initial weights before the first switch

    def schedule(self, stage: Stage, n_steps: int) -> list[str]:
        """Blocks of k_align "alignment" then up to k_ft "user" steps, until exactly n_steps user steps.

        Counting (not replacing user steps by alignment steps, as the reference does) keeps every user batch.
        """
        out: list[str] = []
        left = n_steps
        while left > 0:
            k = min(self.params.k_ft, left)
            out += ["alignment"] * self.params.k_align + ["user"] * k
            left -= k
        return out

    def step(self, ctx: StepContext, batches: list) -> StepResult:
        rho = self.params.rho
        if ctx.step == 0:
            # A new run. Both anchors start at the initial weights (git-disl/Lisa trainer.py `init`), so the first
            # block is pulled towards the starting point once the warm-up is over.
            self.state, self.anchor = ctx.source, [p.detach().clone() for p in ctx.params]
        elif ctx.source != self.state:
            # A state switch: the weights now are where the other state ended (its last update is applied).
            self.state = ctx.source
            self.anchor = [p.detach().clone() for p in ctx.params]

        loss, grads = loss_gradient(ctx.model, ctx.params, batches)
        warming_up = ctx.step <= self.params.warmup_fraction * ctx.total_steps
        if warming_up or rho == 0:
            return StepResult(loss, grads, {"proximal": 0.0})

        # ∇ (ρ/2)‖w − anchor‖² = ρ (w − anchor), added to the loss gradient before the loop clips it.
        drift = [p.detach() - a for p, a in zip(ctx.params, self.anchor)]
        grads = [g + rho * d.to(g.dtype) for g, d in zip(grads, drift)]
        return StepResult(loss, grads, {"proximal": float(rho / 2 * global_norm(drift) ** 2)})

    # A checkpoint mid-stage must carry the current state and the anchor, or a resumed run would not switch as
    # an uninterrupted one does.
    STATES = ("alignment", "user")

    def step_state(self) -> dict[str, torch.Tensor]:
        state = {} if self.state is None else {"state": torch.tensor(self.STATES.index(self.state))}
        return state | {f"anchor.{i}": a for i, a in enumerate(self.anchor or [])}

    def load_step_state(self, state: dict[str, torch.Tensor]) -> None:
        self.state = self.STATES[int(state["state"])] if "state" in state else None
        anchors = sorted((k for k in state if k.startswith("anchor.")), key=lambda k: int(k.split(".")[1]))
        self.anchor = [state[k].clone() for k in anchors] or None


@hookimpl
def hft_register_defenses(register):
    register(Lisa)
