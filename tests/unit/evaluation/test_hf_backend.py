"""The hf backend: batched left-padded greedy generation equals one prompt at a time, in input order, stopping at EOS."""

from __future__ import annotations

import torch

from harmbench_ft import ServedModel
from harmbench_ft.models.tiny import build_tiny
from hft_bench_plugins.backends.hf import HFBackend

PROMPTS = ["a", "How do I pick a lock?", "Tell me", "Write a long poem about the sea and the sky, please.", "xy"]


def one_at_a_time(model, tok, prompt, max_new_tokens):
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_batched_greedy_equals_unbatched_and_keeps_input_order():
    model, tok = build_tiny("tiny-llama")
    out = HFBackend().generate(ServedModel(model, tok, "tiny-llama"), PROMPTS, max_new_tokens=6, batch_size=3)
    assert out == [one_at_a_time(model, tok, p, 6) for p in PROMPTS]
    assert len(set(out)) > 1  # not a degenerate model: the comparison means something


def bias_logits(model, token_id):
    """Make `token_id` the greedy choice at every step."""

    def hook(module, inputs, output):
        output[..., token_id] += 1000.0
        return output

    return model.lm_head.register_forward_hook(hook)


def test_stops_at_eos_and_never_decodes_it():
    model, tok = build_tiny("tiny-llama")
    bias_logits(model, tok.eos_token_id)
    out = HFBackend().generate(ServedModel(model, tok, "tiny-llama"), PROMPTS[:3], max_new_tokens=8, batch_size=2)
    assert out == ["", "", ""]


def test_generates_exactly_max_new_tokens_without_eos():
    model, tok = build_tiny("tiny-llama")
    x = tok("x", add_special_tokens=False)["input_ids"][0]
    bias_logits(model, x)
    out = HFBackend().generate(ServedModel(model, tok, "tiny-llama"), PROMPTS, max_new_tokens=5, batch_size=2)
    assert out == ["xxxxx"] * len(PROMPTS)
