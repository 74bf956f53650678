"""Tiny randomly initialised decoder models and a byte-level tokenizer, built in-process.

They need no download and run the whole pipeline in seconds: the `tiny` preset and the unit tests.
"""

from __future__ import annotations

import functools

import torch

EOS = "<|endoftext|>"

TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma2")


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """One token per byte plus EOS (= pad): any text round-trips, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def tiny_config(name: str, vocab_size: int, eos_id: int):
    """2 layers, width 64: the torchtune/trl habit of shrinking the real architecture."""
    from transformers import AutoConfig

    model_type = name.removeprefix("tiny-")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if model_type == "gemma2":
        common.update(head_dim=16, sliding_window=512)
    return AutoConfig.for_model(model_type, **common)


def build_tiny(name: str, init_seed: int = 0):
    """The same weights for the same name every time (fixed init seed), so no artifact is needed for the base."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(name, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(init_seed)
    model = AutoModelForCausalLM.from_config(config)
    torch.random.set_rng_state(state)
    return model, tokenizer
