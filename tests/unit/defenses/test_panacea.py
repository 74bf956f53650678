"""Panacea's step and final perturbation against an independent re-derivation of protocol.md section 3."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from harmbench_ft import PostContext, Stage, UsageError
from hft_bench_plugins.defenses.panacea import EPSILON_FILE, Panacea, Params
from tests.conftest import ROWS, FixedStream, make_batches, make_ctx, mean_response_ce, tiny_peft_model

USER, HARMFUL = ROWS[:4], ROWS[4:]  # disjoint rows, so g and h really differ


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference(model, user: list, harmful: list, rho: float, lam: float, clamp: float):
    """(update, ε) from plain torch.autograd.grad; the model itself is never moved."""
    w = trainable(model)
    gg = torch.autograd.grad(mean_response_ce(model, w, user), list(w.values()))
    gh = torch.autograd.grad(mean_response_ce(model, w, harmful), list(w.values()))
    norm = torch.sqrt(sum((g**2).sum() for g in gh))
    eps = [rho * g / (norm + 1e-7) for g in gh]
    moved = {n: (p + e).detach().requires_grad_(True) for (n, p), e in zip(w.items(), eps)}
    ghe = torch.autograd.grad(torch.clamp(mean_response_ce(model, moved, harmful), max=clamp), list(moved.values()), allow_unused=True)
    ghe = [torch.zeros_like(p) if g is None else g for g, p in zip(ghe, moved.values())]
    return [a - lam * (b - c) for a, b, c in zip(gg, ghe, gh)], eps, gg, gh


def panacea_step(model, tok, micro: int, params: Params):
    user, harmful = make_batches(tok, USER, micro), make_batches(tok, HARMFUL, micro)
    ctx = make_ctx(model, Stage.FINETUNE, {"user": FixedStream(user), "harmful": FixedStream(harmful)})
    defense = Panacea(params)
    return defense, defense.step(ctx, user), user, harmful


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)


def post_ctx(model, tmp_path) -> PostContext:
    w = trainable(model)
    return PostContext(model, list(w.values()), list(w), seed=0, artifact_dir=tmp_path)


# A clamp far above the tiny model's loss (≈ ln 257 ≈ 5.5, above the default 5) and a large λ, so every
# term of the update is live and stands above float noise.
LIVE = Params(rho=1.0, lam=0.5, clamp=100.0)


def test_update_matches_an_independent_derivation(tiny):
    model, tok = tiny
    before = [p.detach().clone() for p in trainable(model).values()]
    defense, result, user, harmful = panacea_step(model, tok, micro=4, params=LIVE)
    expected, _, gg, _ = reference(model, user, harmful, LIVE.rho, LIVE.lam, LIVE.clamp)
    assert_all_close(result.grads, expected)
    assert max(float((e - g).abs().max()) for e, g in zip(expected, gg)) > 1e-4  # the λ term is really there
    assert result.loss == pytest.approx(float(mean_response_ce(model, trainable(model), user)), rel=1e-5)
    assert result.metrics["clamped"] == 0.0
    assert all(torch.equal(p, b) for p, b in zip(trainable(model).values(), before))  # w restored bit-exactly


def test_epsilon_has_norm_rho_along_the_harmful_gradient(tiny):
    model, tok = tiny
    defense, _, user, harmful = panacea_step(model, tok, micro=4, params=Params(rho=0.3, lam=0.5, clamp=100.0))
    _, eps, _, gh = reference(model, user, harmful, rho=0.3, lam=0.5, clamp=100.0)
    got = list(defense.state_dict().values())
    assert torch.sqrt(sum((e**2).sum() for e in got)).item() == pytest.approx(0.3, rel=1e-5)
    assert list(defense.state_dict()) == list(trainable(model))
    assert_all_close(got, eps)


def test_clamp_above_the_perturbed_loss_zeroes_its_gradient(tiny):
    model, tok = tiny
    params = Params(rho=1.0, lam=0.5, clamp=0.01)  # h(w + ε) ≈ 5.5 > 0.01: min(h, clamp) is flat
    _, result, user, harmful = panacea_step(model, tok, micro=4, params=params)
    assert result.metrics["perturbed_harmful_loss"] > params.clamp and result.metrics["clamped"] == 1.0
    _, _, gg, gh = reference(model, user, harmful, params.rho, params.lam, params.clamp)
    assert_all_close(result.grads, [a + params.lam * b for a, b in zip(gg, gh)])  # Ghe = 0


def test_final_epsilon_is_added_exactly_once(tiny, tmp_path):
    model, tok = tiny
    defense, _, _, _ = panacea_step(model, tok, micro=4, params=LIVE)
    eps = {n: e.clone() for n, e in defense.state_dict().items()}
    finals = []
    for i in range(2):  # two fresh copies of the fine-tuned model, post-processed by the same defense
        copy, _ = tiny_peft_model()
        before = {n: p.detach().clone() for n, p in trainable(copy).items()}
        (tmp_path / str(i)).mkdir()
        report = defense.post_finetune(post_ctx(copy, tmp_path / str(i)))
        after = {n: p.detach().clone() for n, p in trainable(copy).items()}
        assert all(torch.equal(after[n], before[n] + eps[n]) for n in eps)  # w + ε, not w + 2ε
        finals.append(after)
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in eps)
    assert all(torch.equal(defense.state_dict()[n], eps[n]) for n in eps)  # applying does not change ε

    saved = load_file(str(tmp_path / "0" / EPSILON_FILE))
    assert set(saved) == set(eps) and all(torch.equal(saved[n], eps[n]) for n in eps)
    # The per-layer report, grouped independently by the "layers.<i>." part of each name.
    for layer in ("0", "1"):
        norm = torch.sqrt(sum((e**2).sum() for n, e in eps.items() if f".layers.{layer}." in n))
        assert report["layer_norms"][layer] == pytest.approx(float(norm), rel=1e-5)
    assert set(report["layer_norms"]) == {"0", "1"}
    assert report["epsilon_norm"] == pytest.approx(LIVE.rho, rel=1e-5)


def test_state_dict_round_trip_through_safetensors(tiny, tmp_path):
    model, tok = tiny
    defense, _, _, _ = panacea_step(model, tok, micro=4, params=LIVE)
    save_file(defense.state_dict(), str(tmp_path / "state.safetensors"))
    resumed = Panacea(LIVE)
    resumed.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    original, loaded = defense.state_dict(), resumed.state_dict()
    assert set(loaded) == set(original) and all(torch.equal(loaded[n], original[n]) for n in original)  # safetensors sorts keys
    a, _ = tiny_peft_model()
    b, _ = tiny_peft_model()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    defense.post_finetune(post_ctx(a, tmp_path / "a"))
    resumed.post_finetune(post_ctx(b, tmp_path / "b"))
    assert all(torch.equal(p, q) for p, q in zip(trainable(a).values(), trainable(b).values()))


def test_accumulation_over_micro_batches_equals_one_big_batch(tiny):
    model, tok = tiny
    big_defense, big, _, _ = panacea_step(model, tok, micro=4, params=LIVE)
    acc_defense, acc, _, _ = panacea_step(model, tok, micro=1, params=LIVE)
    assert big.loss == pytest.approx(acc.loss, rel=1e-5)
    assert_all_close(acc.grads, big.grads)
    assert_all_close(list(acc_defense.state_dict().values()), list(big_defense.state_dict().values()))


def test_post_finetune_without_epsilon_is_a_usage_error(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(UsageError, match="panacea: no ε"):
        Panacea().post_finetune(post_ctx(model, tmp_path))


@pytest.mark.parametrize("args", [{"rho": -1.0}, {"lam": "inf"}, {"clamp": 0.0}])
def test_out_of_range_parameters_are_usage_errors(args):
    name = next(iter(args))
    with pytest.raises(UsageError, match=f"panacea: {name}="):
        Panacea.make_params(args)
