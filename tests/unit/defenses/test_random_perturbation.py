"""Random perturbation: a seeded draw, the right scale in each mode, and one application."""

import pytest
import torch

from harmbench_ft import PostContext, Stage, UsageError
from hft_bench_plugins.defenses.random_perturbation import Params, RandomPerturbation
from tests.conftest import tiny_peft_model


def post_ctx(params, seed=0, tmp_path=None):
    """A PostContext over bare tensors (the edit only touches ctx.params)."""
    return PostContext(torch.nn.Module(), params, [f"p{i}" for i in range(len(params))], seed, tmp_path)


def peft_ctx(run_seed=0):
    model, _ = tiny_peft_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return PostContext(model, [p for _, p in named], [n for n, _ in named], run_seed, None)


def perturb(ctx, **params):
    with torch.no_grad():  # as the runner calls it
        return RandomPerturbation(Params(**params)).post_finetune(ctx)


def test_same_seed_same_noise_other_seed_other_noise_and_the_run_seed_plays_no_part():
    a, b, c = peft_ctx(run_seed=0), peft_ctx(run_seed=7), peft_ctx(run_seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))  # same starting adapter
    perturb(a, seed=3)
    perturb(b, seed=3)
    perturb(c, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
    assert not any(torch.equal(x, z) for x, z in zip(a.params, c.params))


def test_sigma_mode_has_element_wise_std_sigma():
    params = [torch.nn.Parameter(torch.zeros(1000, 1000)), torch.nn.Parameter(torch.zeros(300, 700))]
    report = perturb(post_ctx(params), mode="sigma", sigma=0.02, seed=1)
    noise = torch.cat([p.detach().flatten() for p in params])
    assert noise.numel() == 1_210_000
    assert float(noise.std()) == pytest.approx(0.02, rel=0.01)
    assert abs(float(noise.mean())) < 0.02 * 5 / noise.numel() ** 0.5
    assert report["mode"] == "sigma" and report["sigma"] == 0.02 and report["n_elements"] == noise.numel()
    assert report["noise_norm"] == pytest.approx(float(noise.double().norm()), rel=1e-4)  # float32 sums of 1.2M squares


def test_norm_mode_gives_global_norm_rho_exactly():
    params = [torch.nn.Parameter(torch.zeros(40, 30)), torch.nn.Parameter(torch.zeros(7)), torch.nn.Parameter(torch.zeros(5, 5, 5))]
    report = perturb(post_ctx(params), mode="norm", rho=2.5, seed=0)
    norm = float(torch.cat([p.detach().flatten() for p in params]).double().norm())
    assert norm == pytest.approx(2.5, rel=1e-6)
    assert report["mode"] == "norm" and report["rho"] == 2.5 and report["noise_norm"] == pytest.approx(2.5, rel=1e-6)


def test_noise_is_added_exactly_once():
    ctx = peft_ctx()
    before = [p.detach().clone() for p in ctx.params]
    perturb(ctx, mode="sigma", sigma=0.05, seed=11)
    # The noise, drawn independently: one CPU generator seeded with the seed alone, tensors in ctx.params order.
    g = torch.Generator().manual_seed(11)
    xi = [torch.randn(p.shape, generator=g) * 0.05 for p in before]
    assert all(torch.equal(p, b + x) for p, b, x in zip(ctx.params, before, xi))


def test_bad_mode_and_negative_scale_are_usage_errors():
    with pytest.raises(UsageError, match=r"mode='gauss'.*sigma, norm"):
        RandomPerturbation.make_params({"mode": "gauss"})
    with pytest.raises(UsageError, match="sigma=-0.1"):
        RandomPerturbation.make_params({"sigma": "-0.1"})
    with pytest.raises(UsageError, match="rho=nan"):
        RandomPerturbation.make_params({"rho": "nan"})


def test_registers_as_random_perturbation_on_the_post_fine_tuning_stage_only():
    from hft_bench_plugins.defenses import random_perturbation

    registered = []
    random_perturbation.hft_register_defenses(registered.append)
    assert registered == [RandomPerturbation]
    assert RandomPerturbation.name == "random-perturbation" and RandomPerturbation.stages == (Stage.POST_FINETUNE,)
