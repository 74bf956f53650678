"""hft-bench: a benchmark suite for defenses against harmful fine-tuning.

The public API, everything a plugin (built-in or third-party) needs, is re-exported here.
"""

import importlib
from typing import TYPE_CHECKING, Any

# name -> module: imported on first use (PEP 562), so `hft-bench --help` and a rerun of a finished run do not pay
# for torch and transformers before they need them.
_EXPORTS = {
    "Example": "harmbench_ft.data.formatting", "normalize_prompt": "harmbench_ft.data.formatting",
    "load_rows": "harmbench_ft.data.sources", "Task": "harmbench_ft.data.tasks",
    "Defense": "harmbench_ft.defense", "NoParams": "harmbench_ft.defense", "PostContext": "harmbench_ft.defense",
    "Stage": "harmbench_ft.defense", "StepContext": "harmbench_ft.defense", "StepResult": "harmbench_ft.defense",
    "UsageError": "harmbench_ft.errors",
    "Backend": "harmbench_ft.evaluation.backends", "ServedModel": "harmbench_ft.evaluation.backends",
    "Judge": "harmbench_ft.evaluation.judges", "incoherent": "harmbench_ft.evaluation.judges",
    "RunEnd": "harmbench_ft.events", "RunStart": "harmbench_ft.events", "StageEnd": "harmbench_ft.events", "StageStart": "harmbench_ft.events",
    "Executor": "harmbench_ft.grid.executor", "GridRun": "harmbench_ft.grid.executor", "Outcome": "harmbench_ft.grid.executor",
    "hookimpl": "harmbench_ft.hookspecs",
    "layers": "harmbench_ft.models.layers",
    "cache_dir": "harmbench_ft.models.loading", "load_base": "harmbench_ft.models.loading", "merge_adapter": "harmbench_ft.models.loading",
    "ModelSpec": "harmbench_ft.spec", "RunSpec": "harmbench_ft.spec", "preset": "harmbench_ft.spec",
    "global_norm": "harmbench_ft.training.gradients", "lm_loss_sum": "harmbench_ft.training.gradients", "loss_gradient": "harmbench_ft.training.gradients",
    "perturbed": "harmbench_ft.training.gradients", "response_tokens": "harmbench_ft.training.gradients", "token_loss_sum": "harmbench_ft.training.gradients",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harmbench_ft' has no attribute {name!r}")
    value = importlib.import_module(module) if name == "layers" else getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from harmbench_ft.data.formatting import Example, normalize_prompt  # noqa: F401
    from harmbench_ft.defense import Defense, PostContext, Stage, StepContext, StepResult  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Defense",
    "Example",
    "Executor",
    "GridRun",
    "Judge",
    "ModelSpec",
    "NoParams",
    "Outcome",
    "PostContext",
    "RunEnd",
    "RunSpec",
    "RunStart",
    "ServedModel",
    "Stage",
    "StageEnd",
    "StageStart",
    "StepContext",
    "StepResult",
    "Task",
    "UsageError",
    "cache_dir",
    "global_norm",
    "hookimpl",
    "incoherent",
    "layers",
    "lm_loss_sum",
    "load_rows",
    "load_base",
    "loss_gradient",
    "merge_adapter",
    "normalize_prompt",
    "perturbed",
    "preset",
    "response_tokens",
    "token_loss_sum",
]
