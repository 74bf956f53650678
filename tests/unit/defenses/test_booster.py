"""Booster's step against an independent re-derivation of protocol.md section 3 from plain autograd calls."""

import pytest
import torch

from harmbench_ft import Stage, UsageError
from hft_bench_plugins.defenses.booster import Booster, Params
from tests.conftest import ROWS, FixedStream, make_batches, make_ctx, mean_response_ce

ALIGNMENT, HARMFUL = ROWS[:4], ROWS[4:]  # disjoint rows, so h and f really differ


def reference_update(model, align: list[dict], harmful: list[dict], lamb: float, alpha: float) -> list[torch.Tensor]:
    """Ga + λ (G1 − G2) with G2 taken at w − α G1/(‖G1‖ + 1e-7), the model itself left untouched."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g1 = torch.autograd.grad(mean_response_ce(model, w, harmful), list(w.values()))
    norm = torch.sqrt(sum((g**2).sum() for g in g1)) + 1e-7
    moved = {n: (w[n] - alpha * g / norm).detach().requires_grad_(True) for n, g in zip(names, g1)}
    g2 = torch.autograd.grad(mean_response_ce(model, moved, harmful), list(moved.values()))
    ga = torch.autograd.grad(mean_response_ce(model, w, align), list(w.values()))
    return [a + lamb * (b - c) for a, b, c in zip(ga, g1, g2)]


def booster_step(model, tok, micro: int, lamb: float = 5.0, alpha: float = 0.1):
    align = make_batches(tok, ALIGNMENT, micro)
    harmful = make_batches(tok, HARMFUL, micro)
    ctx = make_ctx(model, Stage.ALIGNMENT, {"alignment": FixedStream(align), "harmful": FixedStream(harmful)})
    return Booster(Params(lamb=lamb, alpha=alpha)).step(ctx, align), align, harmful


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)


def test_update_matches_the_formula(tiny):
    model, tok = tiny
    # alpha=1 makes the perturbation large enough that G1 − G2 stands well above float noise.
    result, align, harmful = booster_step(model, tok, micro=4, lamb=5.0, alpha=1.0)
    assert_all_close(result.grads, reference_update(model, align, harmful, lamb=5.0, alpha=1.0))
    assert result.loss == pytest.approx(float(mean_response_ce(model, dict(model.named_parameters()), align).detach()), rel=1e-5)
    assert result.metrics["harmful_loss"] == pytest.approx(float(mean_response_ce(model, dict(model.named_parameters()), harmful).detach()), rel=1e-5)
    assert result.metrics["perturbed_harmful_loss"] < result.metrics["harmful_loss"]  # a normalised descent step on h


def test_second_gradient_is_taken_at_the_perturbed_point(tiny):
    model, tok = tiny
    ga = reference_update(model, make_batches(tok, ALIGNMENT, 4), make_batches(tok, HARMFUL, 4), lamb=0.0, alpha=1.0)
    plain, _, _ = booster_step(model, tok, micro=4, lamb=0.0, alpha=1.0)
    assert_all_close(plain.grads, ga)  # λ=0 is SFT on the alignment batch
    boosted, _, _ = booster_step(model, tok, micro=4, lamb=5.0, alpha=1.0)
    diff = torch.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(ga, boosted.grads)))
    size = torch.sqrt(sum((a**2).sum() for a in ga))
    assert diff > 0.01 * size  # G2 at w' ≠ G1 at w: a G2 taken at w would cancel G1 exactly


def test_weights_are_restored_bit_exactly(tiny):
    model, tok = tiny
    before = [p.detach().clone() for p in model.parameters()]
    booster_step(model, tok, micro=2, alpha=1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())  # the loop sets .grad itself


def test_accumulation_equals_one_bigger_batch(tiny):
    model, tok = tiny
    big, _, _ = booster_step(model, tok, micro=4, alpha=1.0)
    accumulated, align, _ = booster_step(model, tok, micro=1, alpha=1.0)
    assert len(align) == 4
    assert_all_close(accumulated.grads, big.grads)
    assert accumulated.loss == pytest.approx(big.loss, rel=1e-5)


@pytest.mark.parametrize("args", [{"lamb": "-1"}, {"alpha": "-0.1"}, {"lamb": "nan"}, {"alpha": "inf"}])
def test_out_of_range_parameters_are_one_line_usage_errors(args):
    with pytest.raises(UsageError) as info:
        Booster.make_params(args)
    message = str(info.value)
    name = next(iter(args))
    assert "\n" not in message and "booster" in message and f"{name}=" in message and ">= 0" in message


def test_defaults_are_the_reference_script_values():
    assert Booster.make_params({}) == Params(lamb=5.0, alpha=0.1)
    assert Booster.needs == ("harmful",) and Booster.stages == (Stage.ALIGNMENT,)
