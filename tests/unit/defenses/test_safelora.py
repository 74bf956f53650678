"""SafeLoRA against an independent re-derivation of protocol.md's formula on tiny Llama and Qwen2 models.

The scenario: an unaligned tiny base, an "alignment" LoRA with random A and B merged into it (W_aligned), and a
fine-tuned LoRA on top whose B mixes a part inside the alignment's column space with a random part, in a different
share per module, so the modules' similarities spread over (0, 1) and τ = 0.5 projects some and not others. The
aligned and base state dicts are handed over with layer 1's keys before layer 0's: pairing by name gives the right
V, pairing by list order the V of the other layer (same shapes, wrong values).
"""

import numpy
import pytest
import torch

from harmbench_ft import PostContext, Stage, UsageError
from harmbench_ft.models.loading import add_lora
from harmbench_ft.models.tiny import build_tiny
from hft_bench_plugins.defenses.safelora import Params, SafeLoRA
from tests.conftest import TINY_TRAIN

ARCHS = ("tiny-llama", "tiny-qwen2")
PREFIX = "base_model.model."


def layers_reversed(state: dict) -> dict:
    """The same dict with every key of decoder layer 1 first: names kept, list order changed."""
    first = [k for k in state if ".layers.1." in k]
    return {k: state[k].clone() for k in first + [k for k in state if k not in first]}


def scenario(arch: str, train=TINY_TRAIN, seed: int = 2):
    """(fine-tuned peft model, aligned weights, base weights), the weights as dicts in a changed key order."""
    model, _ = build_tiny(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    alignment = add_lora(model, TINY_TRAIN)
    with torch.no_grad():
        for n, p in alignment.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    alignment_B = {n.removeprefix(PREFIX).split(".lora_B.")[0]: p.detach().clone() for n, p in alignment.named_parameters() if ".lora_B." in n}
    aligned_model = alignment.merge_and_unload()
    aligned = {k: v.clone() for k, v in aligned_model.state_dict().items()}

    torch.manual_seed(seed)
    finetuned = add_lora(aligned_model, train)
    names = [n for n, _ in finetuned.named_parameters() if ".lora_B." in n]
    g = torch.Generator().manual_seed(3)
    shares = torch.randperm(len(names), generator=g).float() / (len(names) - 1)  # no pattern along the module order
    params = dict(finetuned.named_parameters())
    with torch.no_grad():
        for name, t in zip(names, shares):
            B = params[name]
            inside = alignment_B[name.removeprefix(PREFIX).split(".lora_B.")[0]] @ torch.randn(4, B.shape[1], generator=g) * 0.1
            B.copy_(t * inside + (1 - t) * torch.randn(B.shape, generator=g) * 0.02)
    assert not any(torch.equal(aligned[k], base[k]) for k in base if k.endswith("q_proj.weight"))
    return finetuned, layers_reversed(aligned), layers_reversed(base)


def post_ctx(model, aligned: dict, base: dict) -> PostContext:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return PostContext(
        model, [p for _, p in named], [n for n, _ in named], seed=0, artifact_dir=None,
        aligned_weights=lambda: {k: v.clone() for k, v in aligned.items()}, base_weights=lambda: {k: v.clone() for k, v in base.items()},
    )


def run(model, aligned, base, **params) -> dict:
    with torch.no_grad():  # as the runner calls it
        return SafeLoRA(Params(**params)).post_finetune(post_ctx(model, aligned, base))


def derive(model, aligned: dict, base: dict) -> dict:
    """protocol.md, written out with plain tensors: per module (cos rounded as the reference does, B', B, A)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for name in params:
        if ".lora_B." not in name:
            continue
        module = name.removeprefix(PREFIX).split(".lora_B.")[0]
        B, A = params[name], params[name.replace(".lora_B.", ".lora_A.")]
        V = aligned[module + ".weight"] - base[module + ".weight"]
        C = V @ V.T / V.pow(2).sum().sqrt()  # ‖V‖_F, not squared (model.py get_aligned_matrix)
        new_B = C @ B
        x, y = (new_B @ A).flatten(), (B @ A).flatten()
        cos = float((x @ y) / (x.norm() * y.norm()))
        out[module] = {"cos": float(numpy.round(cos, 5)), "raw": cos, "new_B": new_B, "B": B, "A": A, "C": C}
    return out


def lora(model, kind: str) -> dict:
    return {n.removeprefix(PREFIX).split(f".{kind}.")[0]: p.detach().clone() for n, p in model.named_parameters() if f".{kind}." in n}


def assert_edit(model, expected: dict, projected: set):
    """Projected modules carry B' = C·B (to 1e-6), the others their B bit for bit; every A is untouched."""
    Bs, As = lora(model, "lora_B"), lora(model, "lora_A")
    assert set(Bs) == set(expected)
    for module, e in expected.items():
        assert torch.equal(As[module], e["A"]), module
        if module in projected:
            torch.testing.assert_close(Bs[module], e["new_B"], rtol=1e-6, atol=1e-6, msg=module)
            assert not torch.allclose(Bs[module], e["B"], atol=1e-4), module  # the projection really moved it
        else:
            assert torch.equal(Bs[module], e["B"]), module


@pytest.mark.parametrize("arch", ARCHS)
def test_threshold_mode_matches_an_independent_derivation(arch):
    model, aligned, base = scenario(arch)
    expected = derive(model, aligned, base)
    projected = {m for m, e in expected.items() if e["cos"] <= 0.5}
    assert 3 <= len(projected) <= len(expected) - 3  # τ = 0.5 splits the modules: the test has teeth
    assert all(abs(e["raw"] - 0.5) > 1e-3 for e in expected.values())  # and no float noise decides a module

    report = run(model, aligned, base)  # the defaults: threshold mode, τ = 0.5

    assert_edit(model, expected, projected)
    assert report["mode"] == "threshold" and report["threshold"] == 0.5
    assert report["projected"] == [m for m in expected if m in projected]  # in module order
    assert report["n_projected"] == len(projected) and report["n_modules"] == len(expected) == 14
    assert set(report["similarities"]) == set(expected) and report["no_alignment_delta"] == []
    for module, e in expected.items():
        assert report["similarities"][module] == pytest.approx(e["cos"], abs=1e-5), module
    # Pdst: 1 for a projected module, 1/(1 + ‖B − C·B‖) for one kept.
    pdst = [1.0 if m in projected else 1 / (1 + float((e["B"] - e["new_B"]).norm())) for m, e in expected.items()]
    assert report["pdst"] == pytest.approx(sum(pdst) / len(pdst), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_served_update_is_the_projected_one(arch):
    """What the merged model serves: ΔW' = C · ΔW in the projected modules (the LoRA scaling α/r cancels)."""
    model, aligned, base = scenario(arch)
    expected = derive(model, aligned, base)
    delta = {m: TINY_TRAIN.lora_alpha / TINY_TRAIN.lora_r * e["B"] @ e["A"] for m, e in expected.items()}
    ctx = post_ctx(model, aligned, base)
    with torch.no_grad():
        report = SafeLoRA().post_finetune(ctx)
        merged = ctx.merged_model().state_dict()
    for module, e in expected.items():
        served = merged[module + ".weight"] - aligned[module + ".weight"]
        want = e["C"] @ delta[module] if module in report["projected"] else delta[module]
        torch.testing.assert_close(served, want, rtol=1e-4, atol=1e-6, msg=module)


@pytest.mark.parametrize("arch", ARCHS)
def test_number_mode_projects_the_n_lowest_similarities(arch):
    model, aligned, base = scenario(arch)
    expected = derive(model, aligned, base)
    ranked = sorted(expected, key=lambda m: expected[m]["cos"])
    lowest = set(ranked[:4])
    assert expected[ranked[3]]["cos"] < expected[ranked[4]]["cos"] - 1e-3  # no tie at the 4th value

    report = run(model, aligned, base, mode="number", num_proj_layers=4)

    assert_edit(model, expected, lowest)
    assert set(report["projected"]) == lowest and report["n_projected"] == 4
    assert report["threshold"] == pytest.approx(expected[ranked[3]]["cos"], abs=1e-5) and report["num_proj_layers"] == 4


def test_number_mode_above_the_module_count_projects_every_module():
    model, aligned, base = scenario("tiny-llama")
    expected = derive(model, aligned, base)
    report = run(model, aligned, base, mode="number")  # N = 10 by default, 14 modules here
    assert report["n_projected"] == 10
    model, aligned, base = scenario("tiny-llama")
    report = run(model, aligned, base, mode="number", num_proj_layers=50)
    assert_edit(model, expected, set(expected))
    assert report["n_projected"] == 14


def test_a_threshold_equal_to_a_similarity_projects_that_module():
    """cos ≤ τ, not cos < τ, on the cos rounded to 5 decimals as the reference compares it: the module chosen here
    has a raw cos just above its rounded value, so an unrounded comparison would leave it out."""
    model, aligned, base = scenario("tiny-llama")
    expected = derive(model, aligned, base)
    ranked = sorted(expected, key=lambda m: expected[m]["cos"])
    k = next(i for i in range(2, 12) if expected[ranked[i]]["raw"] - expected[ranked[i]]["cos"] > 1e-6)
    tau = expected[ranked[k]]["cos"]
    assert expected[ranked[k - 1]]["cos"] < tau < expected[ranked[k + 1]]["cos"]  # one module sits exactly at τ
    report = run(model, aligned, base, threshold=tau)
    assert set(report["projected"]) == set(ranked[: k + 1])
    assert_edit(model, expected, set(ranked[: k + 1]))


def test_the_lora_scaling_plays_no_part_in_the_choice_or_in_b_prime():
    from dataclasses import replace

    runs = []
    for alpha in (8, 32):
        model, aligned, base = scenario("tiny-llama", train=replace(TINY_TRAIN, lora_alpha=alpha))
        report = run(model, aligned, base)
        runs.append((report["projected"], report["similarities"], lora(model, "lora_B")))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][m], runs[1][2][m]) for m in runs[0][2])


def test_a_module_the_alignment_left_unchanged_is_never_projected():
    model, aligned, base = scenario("tiny-llama")
    untouched = "model.layers.0.self_attn.q_proj"
    aligned[untouched + ".weight"] = base[untouched + ".weight"].clone()
    B = lora(model, "lora_B")[untouched]
    report = run(model, aligned, base, threshold=1.0)  # τ = 1 projects every module that has a C
    assert report["similarities"][untouched] is None and report["no_alignment_delta"] == [untouched]
    assert untouched not in report["projected"] and report["n_projected"] == 13
    assert torch.equal(lora(model, "lora_B")[untouched], B)


def test_a_missing_weight_and_a_tensor_that_is_no_lora_matrix_are_usage_errors():
    model, aligned, base = scenario("tiny-llama")
    del aligned["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UsageError, match=r"safelora: no weight 'model.layers.1.mlp.up_proj.weight'"):
        run(model, aligned, base)
    model, aligned, base = scenario("tiny-llama")
    ctx = post_ctx(model, aligned, base)
    ctx.params.append(torch.nn.Parameter(torch.zeros(3)))
    ctx.param_names.append("extra.bias")
    with pytest.raises(UsageError, match=r"safelora: .*not LoRA A/B matrices.*extra.bias"):
        SafeLoRA().post_finetune(ctx)


@pytest.mark.parametrize(
    "args, pattern",
    [
        ({"mode": "ranked"}, r"safelora: mode='ranked'.*threshold, number"),
        ({"threshold": "1.5"}, r"safelora: threshold=1.5 .*\[-1, 1\].*default 0.5"),
        ({"threshold": "nan"}, r"safelora: threshold=nan"),
        ({"num_proj_layers": "0"}, r"safelora: num_proj_layers=0 .*>= 1.*default 10"),
    ],
)
def test_out_of_range_parameters_are_usage_errors(args, pattern):
    with pytest.raises(UsageError, match=pattern):
        SafeLoRA.make_params(args)


def test_defaults_and_registration():
    from hft_bench_plugins.defenses import safelora

    assert Params() == Params(mode="threshold", threshold=0.5, num_proj_layers=10)
    registered = []
    safelora.hft_register_defenses(registered.append)
    assert registered == [SafeLoRA]
    assert SafeLoRA.name == "safelora" and SafeLoRA.stages == (Stage.POST_FINETUNE,) and SafeLoRA.post_needs == ()
