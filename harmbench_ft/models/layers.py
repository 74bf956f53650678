"""Find decoder layers, their attention and MLP modules, the final norm and the LM head from a model's
structure, so defenses that hook hidden states work on Llama, Qwen2, Gemma2, Mistral and the like
without a hard-coded class list."""

from __future__ import annotations

from torch import nn

ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _layer_list(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The largest ModuleList whose items all have an attention and an MLP child, and its owner."""
    best = None
    for owner in model.modules():
        for child in owner.children():
            if isinstance(child, nn.ModuleList) and len(child) and all(
                _child(layer, ATTENTION_NAMES) is not None and _child(layer, MLP_NAMES) is not None for layer in child
            ):
                if best is None or len(child) > len(best[1]):
                    best = (owner, child)
    if best is None:
        raise ValueError(f"cannot find decoder layers (a ModuleList of blocks with attention and MLP) in {type(model).__name__}")
    return best


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(_layer_list(model)[1])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [_child(layer, ATTENTION_NAMES) for layer in decoder_layers(model)]


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    return [_child(layer, MLP_NAMES) for layer in decoder_layers(model)]


def final_norm(model: nn.Module) -> nn.Module:
    owner, _ = _layer_list(model)
    norm = _child(owner, NORM_NAMES)
    if norm is None:
        raise ValueError(f"cannot find the final norm next to the decoder layers of {type(model).__name__}")
    return norm


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head
