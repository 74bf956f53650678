"""hft-bench: a benchmark suite for defenses against harmful fine-tuning.

The public API, everything a plugin (built-in or third-party) needs, is re-exported here.
"""

from harmbench_ft.data.formatting import Example, normalize_prompt
from harmbench_ft.data.sources import load_rows
from harmbench_ft.data.tasks import Task
from harmbench_ft.defense import Defense, NoParams, PostContext, Stage, StepContext, StepResult
from harmbench_ft.errors import UsageError
from harmbench_ft.evaluation.backends import Backend, ServedModel
from harmbench_ft.evaluation.judges import Judge, incoherent
from harmbench_ft.events import RunEnd, RunStart, StageEnd, StageStart
from harmbench_ft.grid.executor import Executor, GridRun, Outcome
from harmbench_ft.hookspecs import hookimpl
from harmbench_ft.models import layers
from harmbench_ft.models.loading import cache_dir, load_base, merge_adapter
from harmbench_ft.spec import ModelSpec, RunSpec, preset
from harmbench_ft.training.gradients import global_norm, lm_loss_sum, loss_gradient, perturbed, response_tokens, token_loss_sum

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
