"""Loss and gradient helpers that defense steps are written with.

Loss normalisation under gradient accumulation: a step's loss is the sum of token cross-entropies
over *all* its micro-batches divided by their total number of response tokens. So k micro-batches
give exactly the update of one batch k times larger, whatever the padding of each micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from harmbench_ft.data.formatting import IGNORE_INDEX


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of positions that carry loss (after the shift of causal LM)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over response tokens (prompt and padding are -100).

    The LM head (49k-way for SmolLM2, a fifth of the model's FLOPs) runs only at the positions that
    predict a response token in some row of the batch (`logits_to_keep`); the loss is unchanged.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep: compute every position
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_loss_sum(logits, batch["labels"])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets[:, keep].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def loss_gradient(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    loss_sum_fn: LossFn = lm_loss_sum,
) -> tuple[float, list[torch.Tensor]]:
    """Mean token loss over all micro-batches and its gradient w.r.t. ``params`` (new tensors).

    ``.grad`` of the parameters is left as it was found (None).
    """
    total = max(sum(response_tokens(b) for b in batches), 1)
    for p in params:
        p.grad = None
    loss_value = 0.0
    for batch in batches:
        loss = loss_sum_fn(model, batch) / total
        loss.backward()
        loss_value += float(loss.detach())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return loss_value, grads


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors together."""
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


@contextlib.contextmanager
def perturbed(params: list[torch.nn.Parameter], deltas: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily move ``params`` by ``deltas``; restore them bit-exactly from a saved copy."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
