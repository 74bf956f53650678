"""The gradient helpers every defense is written with, and the loss normalisation under accumulation."""

import torch

from harmbench_ft.training.gradients import global_norm, lm_loss_sum, loss_gradient, perturbed, response_tokens
from tests.conftest import ROWS, make_batches


def test_accumulation_over_micro_batches_equals_one_big_batch(tiny):
    model, tok = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    _, big = loss_gradient(model, params, make_batches(tok, ROWS, micro=8))
    _, acc = loss_gradient(model, params, make_batches(tok, ROWS, micro=2))
    assert len(make_batches(tok, ROWS, micro=2)) == 4
    for a, b in zip(big, acc):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_is_mean_over_response_tokens_only(tiny):
    model, tok = tiny
    batch = make_batches(tok, ROWS[:2], micro=2)[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Independent: cross-entropy at the positions whose next token is a response token.
    total, count = 0.0, 0
    for b in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = batch["labels"][b, t + 1]
            if target != -100:
                total += -torch.log_softmax(logits[b, t], -1)[target].item()
                count += 1
    assert count == response_tokens(batch) > 0
    assert abs(lm_loss_sum(model, batch).item() - total) < 1e-3


def test_perturbed_restores_weights_bit_exactly(tiny):
    model, _ = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    deltas = [torch.randn_like(p) * 0.1 for p in params]
    with perturbed(params, deltas):
        assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_global_norm_is_one_norm_over_all_tensors():
    tensors = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    assert global_norm(tensors).item() == 5.0
