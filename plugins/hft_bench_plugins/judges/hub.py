"""Loading a judge's weights from the Hugging Face hub (or its local cache), failing in one clear line."""

from __future__ import annotations

from typing import Any, Callable

from harmbench_ft import UsageError


def load_or_explain(judge: str, model_id: str, load: Callable[[], Any]) -> Any:
    """Run `load()`; any failure becomes one line naming the judge, the weights and the ways out.

    Large judges are never bundled: they come from the hub or the local hub cache, so a machine without
    hub access (or without the licence of a gated model) must be told what to do instead of a traceback.
    """
    try:
        return load()
    except Exception as exc:  # OSError (not found, no network, gated), ValueError (bad id), ImportError
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"judge {judge!r} could not load its weights {model_id!r} ({type(exc).__name__}: {first_line}); "
            f"download them where the hub is reachable (huggingface-cli download {model_id}; gated models need an "
            "accepted licence and HF_TOKEN) and set HF_HUB_OFFLINE=1 to use the cache, "
            "or use the offline CPU judges: --judge harm-clf or --judge keyword"
        ) from None


def load_judge_model(judge: str, model_id: str, auto_class: str, padding_side: str, device: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) of a hub judge, in eval mode on `device` (bf16 on CUDA), or one clear error line."""
    import torch
    import transformers

    device = pick_device(device)

    def load():
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id, padding_side=padding_side)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = getattr(transformers, auto_class).from_pretrained(model_id, dtype=dtype, use_safetensors=True)  # never a pickle
        return model.to(device).eval(), tokenizer

    return load_or_explain(judge, model_id, load)


def pick_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
