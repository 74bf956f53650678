"""A third-party defense for hft-bench, in one module: fine-tuning with an L2 pull to the aligned model.

Install it next to hft-bench (`pip install -e examples/hft-bench-example-defense`) and run
`hft-bench run --defense example-l2-anchor --defense-arg mu=0.1`. It uses only the public API.

The fine-tuning adapter starts at zero (LoRA's B = 0), i.e. at the aligned model, so pulling the
adapter's tensors towards their starting values keeps the fine-tuned model near the aligned one.
"""

from __future__ import annotations

from dataclasses import dataclass

from harmbench_ft import Defense, Stage, StepResult, hookimpl, loss_gradient


@dataclass
class Params:
    mu: float = 0.1  # strength of the pull; illustrative, not from a paper

    def validate(self) -> None:
        if self.mu < 0:
            raise ValueError(f"example-l2-anchor: mu must be >= 0, got {self.mu}")


class L2Anchor(Defense):
    name = "example-l2-anchor"
    description = "Fine-tuning with gradient + mu * (w - w_start): an L2 pull towards the aligned model."
    stages = (Stage.FINETUNE,)
    Params = Params

    def step(self, ctx, batches):
        if ctx.step == 0:
            self.start = [p.detach().clone() for p in ctx.params]
        loss, grads = loss_gradient(ctx.model, ctx.params, batches)
        pulled = [g + self.params.mu * (p.detach() - s) for g, p, s in zip(grads, ctx.params, self.start)]
        return StepResult(loss, pulled)


@hookimpl
def hft_register_defenses(register):
    register(L2Anchor)
