"""Vaccine (alignment stage): align so the model stays aligned when its hidden states drift.

The perturbed "embeddings" are the outputs of every decoder layer's attention module (protocol.md
section 3). Per step: find the worst-case perturbation ε of global norm ρ from the gradient of the
alignment loss w.r.t. those outputs, then take the gradient of the alignment loss with ε added.
Two forward/backward passes per step.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from harmbench_ft import Defense, Stage, StepContext, StepResult, UsageError, global_norm, hookimpl, layers, lm_loss_sum, loss_gradient, response_tokens


@dataclass
class Params:
    # ρ, global L2 norm of the perturbation over all layers: protocol.md section 3 (Vaccine paper's sweep,
    # ρ=2: HS 49.0, FA 93.6). git-disl/Booster script/alignment/vaccine.sh re-ran Vaccine with RHO=5.
    rho: float = 2.0

    def validate(self) -> None:
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise UsageError(f"vaccine: rho={self.rho} is out of range; it must be a finite number >= 0 (default {Params().rho})")


@contextlib.contextmanager
def shifted_attention(modules: list[torch.nn.Module], shift: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, layer l's attention output a_l is replaced by a_l + shift(l, a_l).

    HF attention modules return a tuple whose first element is the attention output. The hooks are
    removed on exit, error or not, so no later forward pass is perturbed by accident.
    """

    def hook_for(index: int):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            moved = first + shift(index, first)
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Vaccine(Defense):
    name = "vaccine"
    description = "Perturbation-aware alignment (Huang et al. 2024): train against a worst-case ρ-perturbation of every layer's attention output; 2x SFT cost."
    stages = (Stage.ALIGNMENT,)
    Params = Params

    def step(self, ctx: StepContext, batches: list) -> StepResult:
        attention = layers.attention_modules(ctx.model)
        total = max(sum(response_tokens(b) for b in batches), 1)  # the step's mean, as loss_gradient takes it

        # Pass 1: g_l = ∂f/∂a_l. A zero probe added to each a_l has exactly that gradient, and works even
        # where a_l itself does not require grad (no trainable tensor upstream of it).
        loss, grads_out = 0.0, []  # grads_out[micro-batch][layer]
        for batch in batches:
            probes = []

            def probe(index: int, out: torch.Tensor) -> torch.Tensor:
                probes.append(torch.zeros_like(out, requires_grad=True))
                return probes[-1]

            with shifted_attention(attention, probe):
                batch_loss = lm_loss_sum(ctx.model, batch) / total
            grads_out.append(torch.autograd.grad(batch_loss, probes))
            loss += float(batch_loss.detach())

        # ε_l = ρ g_l / ‖g‖, one norm over all layers and all micro-batches of the step, so k
        # micro-batches give the update of one batch k times larger (padding positions have g = 0).
        # The 1e-7 keeps a zero gradient safe, as in the reference.
        norm = global_norm([g for per_batch in grads_out for g in per_batch]) + 1e-7
        epsilons = iter([[(self.params.rho * g / norm).detach() for g in per_batch] for per_batch in grads_out])

        # Pass 2: the alignment loss with a_l + ε_l (ε a constant); only these gradients make the update.
        # loss_gradient visits the micro-batches in order, so each draws its own ε from the iterator.
        def perturbed_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            eps = next(epsilons)
            with shifted_attention(attention, lambda index, out: eps[index].to(out.dtype)):
                return lm_loss_sum(model, batch)

        perturbed_loss, grads = loss_gradient(ctx.model, ctx.params, batches, perturbed_loss_sum)
        return StepResult(loss, grads, {"perturbed_loss": perturbed_loss, "attention_grad_norm": float(norm)})


@hookimpl
def hft_register_defenses(register):
    register(Vaccine)
