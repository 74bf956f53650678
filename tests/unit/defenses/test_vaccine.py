"""Vaccine's step against an independent re-derivation of protocol.md section 3, on Llama and Qwen2."""

import pytest
import torch
import torch.nn.functional as F

from harmbench_ft import Stage, UsageError
from hft_bench_plugins.defenses.vaccine import Params, Vaccine
from tests.conftest import ROWS, FixedStream, make_batches, make_ctx, tiny_peft_model

ARCHITECTURES = ["tiny-llama", "tiny-qwen2"]
RHO = 2.0


def decoder_layers(model):
    """Spelled out for Llama/Qwen2 under the peft wrapper, independent of harmbench_ft.layers."""
    return list(model.base_model.model.model.layers)


def response_ce_sum(model, batch: dict) -> torch.Tensor:
    """Written from the definition: summed next-token CE over response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return -(logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum()


def reference_update(model, batches: list[dict], rho: float) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The second-pass gradient, and ε per batch per layer, from retain-style capture and plain autograd.grad."""
    attention = [layer.self_attn for layer in decoder_layers(model)]
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, out: captured.append(out[0])) for m in attention]
    try:
        loss = sum(response_ce_sum(model, b) for b in batches) / count
    finally:
        for h in handles:
            h.remove()
    g = torch.autograd.grad(loss, captured)  # one forward per batch, layers in order
    norm = torch.sqrt(sum((x**2).sum() for x in g)) + 1e-7
    eps = [rho * x / norm for x in g]
    per_batch = [eps[i : i + len(attention)] for i in range(0, len(eps), len(attention))]

    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for batch, batch_eps in zip(batches, per_batch):
        handles = [m.register_forward_hook(lambda m, a, out, e=e: (out[0] + e, *out[1:])) for m, e in zip(attention, batch_eps)]
        try:
            total = total + response_ce_sum(model, batch) / count
        finally:
            for h in handles:
                h.remove()
    return list(torch.autograd.grad(total, params)), per_batch


def vaccine_step(model, tok, micro: int, rho: float = RHO, rows=ROWS[:4]):
    batches = make_batches(tok, rows, micro)
    ctx = make_ctx(model, Stage.ALIGNMENT, {"alignment": FixedStream(batches)})
    return Vaccine(Params(rho=rho)).step(ctx, batches), batches


def hook_count(model) -> int:
    return sum(len(layer.self_attn._forward_hooks) for layer in decoder_layers(model))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_update_matches_the_formula(arch):
    model, tok = tiny_peft_model(arch)
    result, batches = vaccine_step(model, tok, micro=4)
    expected, _ = reference_update(model, batches, RHO)
    assert len(result.grads) == len(expected)
    for a, e in zip(result.grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        clean = float(sum(response_ce_sum(model, b) for b in batches) / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
    assert result.loss == pytest.approx(clean, rel=1e-5)
    assert result.metrics["perturbed_loss"] > result.loss  # ε is an ascent direction of f


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_second_pass_sees_attention_output_plus_eps_of_norm_rho(arch):
    """Read what the residual stream receives from each attention module, h_mid − h_in, against the
    module's own output: the difference is the plugin's ε (zero in the first pass)."""
    model, tok = tiny_peft_model(arch)
    batches = make_batches(tok, ROWS[:4], 4)
    _, (ref_eps,) = reference_update(model, batches, RHO)
    records = []  # one dict per (forward pass, layer)
    handles = []
    for layer in decoder_layers(model):
        rec: dict[str, list] = {"raw": [], "h_in": [], "h_mid": []}
        records.append(rec)
        # Registered before the plugin's hook, so it sees the unshifted output.
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, out, rec=rec: rec["raw"].append(out[0].detach().clone())))
        handles.append(layer.input_layernorm.register_forward_pre_hook(lambda m, a, rec=rec: rec["h_in"].append(a[0].detach().clone())))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, rec=rec: rec["h_mid"].append(a[0].detach().clone())))
    hooks_before = hook_count(model)
    try:
        vaccine_step(model, tok, micro=4)
        assert hook_count(model) == hooks_before  # the plugin's hooks are gone
    finally:
        for h in handles:
            h.remove()

    shifts = [[rec["h_mid"][k] - rec["h_in"][k] - rec["raw"][k] for rec in records] for k in range(2)]
    assert all(len(rec["raw"]) == 2 for rec in records)  # exactly two forward passes
    for first_pass in shifts[0]:
        assert first_pass.abs().max() < 1e-6
    plugin_eps = shifts[1]
    assert torch.sqrt(sum((e**2).sum() for e in plugin_eps)).item() == pytest.approx(RHO, rel=1e-4)
    for got, want in zip(plugin_eps, ref_eps):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_accumulation_equals_one_bigger_batch():
    model, tok = tiny_peft_model("tiny-llama")
    big, _ = vaccine_step(model, tok, micro=4)
    accumulated, batches = vaccine_step(model, tok, micro=1)
    assert len(batches) == 4
    for a, b in zip(accumulated.grads, big.grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert accumulated.loss == pytest.approx(big.loss, rel=1e-5)
    assert accumulated.metrics["perturbed_loss"] == pytest.approx(big.metrics["perturbed_loss"], rel=1e-5)


def test_hooks_are_removed_when_the_forward_pass_fails(tiny):
    model, tok = tiny

    def fail(module, args, output):
        raise RuntimeError("boom")

    broken = decoder_layers(model)[-1].mlp.register_forward_hook(fail)  # fails while the plugin's hooks are on
    before = hook_count(model)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vaccine_step(model, tok, micro=4)
    finally:
        broken.remove()
    assert hook_count(model) == before == 0


@pytest.mark.parametrize("arch", ["tiny-gemma2", "tiny-mistral"])
def test_runs_on_other_decoders(arch):
    model, tok = tiny_peft_model(arch)
    result, _ = vaccine_step(model, tok, micro=2, rows=ROWS[:2])
    assert all(torch.isfinite(g).all() for g in result.grads)
    assert result.metrics["perturbed_loss"] > result.loss


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_out_of_range_rho_is_a_one_line_usage_error(value):
    with pytest.raises(UsageError) as info:
        Vaccine.make_params({"rho": value})
    message = str(info.value)
    assert "\n" not in message and "vaccine" in message and "rho=" in message and ">= 0" in message


def test_default_rho_is_the_protocol_value():
    assert Vaccine.make_params({}).rho == 2.0
