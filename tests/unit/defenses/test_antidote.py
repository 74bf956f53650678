"""Antidote's pruning against an independent re-derivation of protocol.md's Wanda formula on tiny models."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from harmbench_ft import PostContext, Stage, UsageError
from harmbench_ft.models.tiny import build_tiny
from hft_bench_plugins.defenses.antidote import Antidote, Params
from tests.conftest import ROWS, tiny_peft_model


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def post_ctx(model, tok, harmful=ROWS) -> PostContext:
    w = trainable(model)
    return PostContext(model, list(w.values()), list(w), seed=0, artifact_dir=None, tokenizer=tok, harmful=list(harmful))


def prune(ctx, **params):
    with torch.no_grad():  # as the runner calls it
        return Antidote(Params(**params)).post_finetune(ctx)


def lora_inputs(model, tok, examples, max_length):
    """{wrapper name: (all-token input X, A, B)} for every LoRA-wrapped projection, from one plain forward per row."""
    wrappers = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    seen = {n: [] for n in wrappers}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))) for n, m in wrappers.items()]
    model.eval()
    with torch.no_grad():
        for e in examples:
            ids = (tok(e.prompt + e.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_length]
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {n: (torch.cat(seen[n]).double(), m.lora_A["default"].weight.detach().double(), m.lora_B["default"].weight.detach().double()) for n, m in wrappers.items()}


def rowwise_top(score, k):
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, score.topk(k, dim=1).indices, True) if k else mask


def expected_masks(inputs, dense_ratio, variant="wanda"):
    """{adapter tensor name: True where zeroed}: in each output row of every lora_A (input X) and lora_B (input X·Aᵀ),
    the cols − int(cols·(1 − dense_ratio)) entries of largest |W_ij|·‖X_j‖₂, ‖X_j‖₂ over all tokens. The other
    variants are the plausible mistakes this file must tell apart."""
    masks = {}
    for n, (x, a, b) in inputs.items():
        for key, w, inp in (("lora_A", a, x), ("lora_B", b, x @ a.T)):
            cols = w.shape[1]
            k = cols - int(cols * (1 - dense_ratio))
            norm = inp.norm(dim=0)  # per input feature
            if variant == "wanda":
                mask = rowwise_top(w.abs() * norm, k)
            elif variant == "smallest":
                mask = rowwise_top(-(w.abs() * norm), k)
            elif variant == "whole-matrix":
                score = (w.abs() * norm).flatten()
                mask = torch.zeros_like(score, dtype=torch.bool)
                mask[score.topk(k * w.shape[0]).indices] = True
                mask = mask.reshape(w.shape)
            elif variant == "output-axis":
                mask = rowwise_top(w.abs() * (inp @ w.T).norm(dim=0).reshape(-1, 1), k)
            elif variant == "magnitude":
                mask = rowwise_top(w.abs(), k)
            masks[f"{n}.{key}.default.weight"] = mask
    return masks


def assert_clear_boundaries(inputs, dense_ratio):
    """No row has a near-tie at the pruning boundary, so float32 vs float64 rounding cannot flip an entry."""
    for x, a, b in inputs.values():
        for w, inp in ((a, x), (b, x @ a.T)):
            cols = w.shape[1]
            k = cols - int(cols * (1 - dense_ratio))
            top = (w.abs() * inp.norm(dim=0)).sort(dim=1, descending=True).values
            assert ((top[:, k - 1] - top[:, k]) / top[:, k - 1] > 1e-6).all()


@pytest.mark.parametrize("name, max_length, n_calibration", [("tiny-llama", 256, 6), ("tiny-qwen2", 256, 6), ("tiny-llama", 100, 8)])
def test_edit_matches_an_independent_derivation(name, max_length, n_calibration):
    model, tok = tiny_peft_model(name)
    inputs = lora_inputs(model, tok, ROWS[:n_calibration], max_length)
    assert_clear_boundaries(inputs, 0.1)
    masks = expected_masks(inputs, 0.1)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    assert set(masks) == set(before)  # every adapter tensor is a LoRA A/B of a decoder block here

    ctx = post_ctx(model, tok)
    model.train()
    report = prune(ctx, max_length=max_length, n_calibration=n_calibration)

    after = trainable(model)
    for n, mask in masks.items():
        assert torch.equal(after[n], before[n].masked_fill(mask, 0)), n
    assert model.training and ctx.full_model is None  # mode restored; the result is still the adapter
    assert all(p.grad is None for p in after.values())  # forward passes only
    assert all(a is b for a, b in zip(ctx.params, after.values()))  # edited in place

    lengths = [min(len(e.prompt.encode()) + len(e.output.encode()) + 1, max_length) for e in ROWS[:n_calibration]]  # byte tokenizer
    assert report["rows_used"] == n_calibration and report["rows_available"] == len(ROWS)
    assert report["calibration_tokens"] == sum(lengths) and any(n == max_length for n in lengths) == (max_length == 100)
    for n, mask in masks.items():
        assert report["pruned_fraction_per_module"][n] == int(mask.sum()) / mask.numel()
    assert report["pruned_fraction"] == pytest.approx(sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()), rel=1e-12)
    # The reference's count per row, by hand for widths 64, 128 (lora_A) and rank 4 (lora_B): 7, 13 and 1.
    assert report["pruned_fraction_per_module"]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == 7 / 64
    assert report["pruned_fraction_per_module"]["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"] == 13 / 128
    assert report["pruned_fraction_per_module"]["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"] == 1 / 4
    assert report["untouched_adapter_tensors"] == []


@pytest.mark.parametrize("variant", ["smallest", "whole-matrix", "output-axis", "magnitude"])
def test_each_plausible_mistake_gives_another_adapter(variant):
    """The derivation above has teeth: each wrong variant zeroes other entries somewhere on these models."""
    for name in ("tiny-llama", "tiny-qwen2"):
        model, tok = tiny_peft_model(name)
        inputs = lora_inputs(model, tok, ROWS[:6], 256)
        right, wrong = expected_masks(inputs, 0.1), expected_masks(inputs, 0.1, variant)
        assert sum(int((right[n] != wrong[n]).any()) for n in right) >= len(right) // 2


def lora_model(targets: list[str], dropout: float = 0.0):
    """A tiny Llama with an r=4 LoRA on `targets` whose B matrices are random (so every score is non-zero)."""
    model, tok = build_tiny("tiny-llama")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model, tok


def test_lora_dropout_is_off_during_calibration():
    model, tok = lora_model(["q_proj", "down_proj"], dropout=0.5)
    inputs = lora_inputs(model, tok, ROWS, 256)  # eval mode: dropout is the identity
    masks = expected_masks(inputs, 0.1)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    model.train()  # dropout would be live here
    prune(post_ctx(model, tok), n_calibration=8)
    assert all(torch.equal(trainable(model)[n], before[n].masked_fill(m, 0)) for n, m in masks.items())


def test_calibration_takes_at_most_the_rows_available():
    a, tok = tiny_peft_model()
    b, _ = tiny_peft_model()
    report = prune(post_ctx(a, tok), n_calibration=100)
    prune(post_ctx(b, tok), n_calibration=len(ROWS))
    assert report["rows_used"] == len(ROWS) and report["n_calibration"] == 100
    assert all(torch.equal(p, q) for p, q in zip(trainable(a).values(), trainable(b).values()))


def test_dense_ratio_zero_keeps_the_adapter_and_one_zeroes_it():
    model, tok = tiny_peft_model()
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    assert prune(post_ctx(model, tok), dense_ratio=0.0)["pruned_fraction"] == 0
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())
    assert prune(post_ctx(model, tok), dense_ratio=1.0)["pruned_fraction"] == 1
    assert all(not p.any() for p in trainable(model).values())


def test_adapter_tensors_outside_the_decoder_blocks_are_left_alone_and_reported():
    model, tok = lora_model(["q_proj", "lm_head"])
    head = {n: p.detach().clone() for n, p in trainable(model).items() if "lm_head" in n}
    report = prune(post_ctx(model, tok))
    assert sorted(report["untouched_adapter_tensors"]) == sorted(head) and len(head) == 2
    assert all(torch.equal(trainable(model)[n], t) for n, t in head.items())
    assert len(report["pruned_fraction_per_module"]) == 4  # q_proj A and B of both blocks


def test_no_calibration_rows_is_a_usage_error():
    model, tok = tiny_peft_model()
    with pytest.raises(UsageError, match="antidote: no calibration rows"):
        prune(post_ctx(model, tok, harmful=[]))


@pytest.mark.parametrize("args", [{"dense_ratio": "-0.1"}, {"dense_ratio": "1.5"}, {"dense_ratio": "nan"}, {"n_calibration": "0"}, {"max_length": "0"}])
def test_out_of_range_parameters_are_usage_errors(args):
    name, value = next(iter(args.items()))
    with pytest.raises(UsageError, match=rf"antidote: {name}={value}.*default"):
        Antidote.make_params(args)


def test_registers_as_antidote_on_the_post_fine_tuning_stage_reading_the_harmful_rows():
    from hft_bench_plugins.defenses import antidote

    registered = []
    antidote.hft_register_defenses(registered.append)
    assert registered == [Antidote]
    assert Antidote.name == "antidote" and Antidote.stages == (Stage.POST_FINETUNE,) and Antidote.post_needs == ("harmful",)
    assert Antidote.make_params({}) == Params(dense_ratio=0.1, n_calibration=2000, max_length=256)
