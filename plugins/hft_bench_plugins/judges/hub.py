"""Loading a judge's weights from the Hugging Face hub (or its local cache), failing in one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harmbench_ft import UsageError

WAYS_OUT = (
    "download them where the hub is reachable (huggingface-cli download {model_id}; gated models need an "
    "accepted licence and HF_TOKEN) and set HF_HUB_OFFLINE=1 to use the cache, "
    "or use the offline CPU judges: --judge pair-clf or --judge keyword"
)


def load_or_explain(judge: str, model_id: str, load: Callable[[], Any]) -> Any:
    """Run `load()`; any failure becomes one line naming the judge, the weights and the ways out.

    Large judges are never bundled: they come from the hub or the local hub cache, so a machine without
    hub access (or without the licence of a gated model) must be told what to do instead of a traceback.
    """
    try:
        return load()
    except Exception as exc:  # OSError (not found, no network, gated), ValueError (bad id), ImportError
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"judge {judge!r} could not load its weights {model_id!r} ({type(exc).__name__}: {first_line}); {WAYS_OUT.format(model_id=model_id)}") from None


def check_weights(judge: str, model_id: str) -> None:
    """Before a run: the judge's safetensors weights are in the local hub cache, or the hub says they can be
    downloaded (the repository exists and its licence is accepted). One clear line otherwise; nothing is loaded."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    if Path(model_id).expanduser().is_dir():  # a local checkpoint folder
        if any(Path(model_id).expanduser().glob("*.safetensors")):
            return
        raise UsageError(f"judge {judge!r}: the folder {model_id!r} holds no safetensors weights (a pickled checkpoint is never loaded)")
    try:
        folder = huggingface_hub.snapshot_download(model_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors"])
        if any(Path(folder).glob("*.safetensors")):
            return
        cached = "its cache holds no safetensors weights"
    except (errors.LocalEntryNotFoundError, OSError, ValueError):
        cached = "it is not in the local hub cache"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"judge {judge!r}: weights {model_id!r} are needed at evaluation, but {cached} and HF_HUB_OFFLINE is set; {WAYS_OUT.format(model_id=model_id)}")
    try:
        huggingface_hub.auth_check(model_id)
    except Exception as exc:  # gated without a licence, not found, or the hub unreachable
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"judge {judge!r}: weights {model_id!r} are needed at evaluation, but {cached} and the hub could not confirm them ({type(exc).__name__}: {first_line}); {WAYS_OUT.format(model_id=model_id)}") from None


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
