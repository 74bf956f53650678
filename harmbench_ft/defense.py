"""The defense interface: what a plugin implements and what the runner gives it.

A defense is one class: a typed ``Params`` dataclass (defaults commented with their source), the
stages it acts on, the provider data it needs, and the pieces it changes: the update of one
optimizer step (``step``), which data each step draws (``schedule``), and an edit of the fine-tuned
adapter (``post_finetune``). The runner owns the training loop; a defense never writes one.

For the stages it does not act on, a defense gets plain SFT. A defense that acts on the alignment
stage gets its own alignment artifact; all others share the plain SFT alignment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from harmbench_ft.errors import UsageError


class Stage(str, enum.Enum):
    ALIGNMENT = "alignment"
    FINETUNE = "finetune"
    POST_FINETUNE = "post_finetune"


# Data a step can draw batches from (StepContext.batches):
#   "alignment"         the alignment set: (harmful prompt, refusal)
#   "harmful"           the provider's harmful set: (harmful prompt, harmful answer)
#   "harmful_refusals"  the same prompts as "harmful", in the same order, answered safely
#   "user"              the user's upload (fine-tuning stage only)
DATA_SOURCES = ("alignment", "harmful", "harmful_refusals", "user")
PRIMARY_SOURCE = {Stage.ALIGNMENT: "alignment", Stage.FINETUNE: "user"}


@dataclass
class NoParams:
    def validate(self) -> None:
        pass


@dataclass
class StepResult:
    """What one step returns: the loss to log and the update direction, one tensor per trainable parameter.

    The loop sets ``p.grad = grad`` for each parameter, clips the global norm and calls AdamW.
    """

    loss: float
    grads: list[torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """Everything a step may use. ``params`` are the trainable (LoRA) tensors, in a fixed order."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    param_names: list[str]
    stage: Stage
    step: int  # 0-based optimizer step within the stage
    total_steps: int
    source: str  # the data source the scheduled batches of this step come from
    streams: dict[str, Any]  # source name -> BatchStream

    def batches(self, source: str) -> list[dict[str, torch.Tensor]]:
        """The next optimizer step's worth of micro-batches of a data source."""
        if source not in self.streams:
            raise KeyError(f"data source {source!r} is not available in the {self.stage.value} stage; declare it in Defense.needs")
        return self.streams[source].next_step()


@dataclass
class PostContext:
    """What a post-fine-tuning edit gets: the fine-tuned model with its adapter's tensors trainable, and what a
    provider still holds after the user's fine-tune.

    An edit either changes ``params`` (the fine-tuned adapter) in place, the result then being that adapter, or
    takes ``merged_model()`` (the fine-tuned weights merged into a plain model), edits those full weights and hands
    them to ``keep_full_weights``; the runner saves a full-weight result as a safetensors model folder and serves it
    instead of base + adapters. Every data window here is disjoint from the HS test prompts and the attack rows.
    """

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    param_names: list[str]
    seed: int
    artifact_dir: Path  # where the edit may save files beside the adapter (e.g. Panacea's epsilon)
    tokenizer: Any = None
    # The provider's harmful (prompt, harmful answer) rows: the same window as the "harmful" data source.
    harmful: list[Any] = field(default_factory=list)
    # Held-out (Example, row) pairs of the task's train split (neither the upload nor any FA row), for an edit's
    # own choices (restoration's rollback and checkpoint); score them with `task_score`.
    task_validation: list[Any] = field(default_factory=list)
    # Lazily computed full weights by parameter name of the plain model: the aligned model (base + alignment
    # adapter) and the base (unaligned) model. Each call builds them anew (a model's worth of memory).
    aligned_weights: Any = None  # Callable[[], dict[str, torch.Tensor]]
    base_weights: Any = None  # Callable[[], dict[str, torch.Tensor]]
    # task_score(model, rows) -> percent correct of a plain model on (Example, row) pairs, generated as the
    # evaluation generates (greedy, the task's answer budget) and scored by the task.
    task_score: Any = None
    full_model: torch.nn.Module | None = None  # set by keep_full_weights
    # progress(message): one line of progress for a long edit (the runner prints it on stderr, with the defense's name)
    progress: Any = None

    def report_progress(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def merged_model(self) -> torch.nn.Module:
        """The fine-tuned model as plain full weights (the adapter merged in); ``params`` are stale afterwards."""
        merged = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged

    def keep_full_weights(self, model: torch.nn.Module) -> None:
        """Make these full weights the edit's result (instead of the adapter)."""
        self.full_model = model


class Defense:
    """Base class of every defense; the defaults are plain SFT."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()  # provider data beyond the stage's primary source
    # Parameters added after results were published, each with the value a stored record without it meant (RepNoise:
    # {"variant": "response-tokens"}). While a parameter holds that value it is left out of run ids and artifact
    # keys, so the stored runs are still found; a stored spec that lacks it is read with that value.
    params_added_later: ClassVar[dict[str, Any]] = {}
    # What a post-fine-tuning edit reads beyond the fine-tuned model, so it enters the edit's artifact key:
    # "harmful" (PostContext.harmful), "task_validation" (PostContext.task_validation).
    post_needs: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    # -- parameters -------------------------------------------------------------------------------

    @classmethod
    def make_params(cls, args: dict[str, Any] | None = None) -> Any:
        """Build and validate Params from user arguments (strings from the CLI are parsed)."""
        from harmbench_ft.spec import parse_value

        args = dict(args or {})
        known = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise UsageError(f"defense {cls.name!r} has no parameter(s) {unknown}; its parameters: {sorted(known) or 'none'}")
        hints = typing.get_type_hints(cls.Params)
        values = {k: parse_value(v, hints[k], f"{cls.name}.{k}") for k, v in args.items()}
        params = cls.Params(**values)
        try:
            params.validate()
        except ValueError as exc:  # third parties need not import our error types
            raise UsageError(str(exc)) from None
        return params

    @classmethod
    def parameter_table(cls) -> list[dict[str, Any]]:
        defaults = cls.Params()
        return [{"name": f.name, "type": getattr(f.type, "__name__", str(f.type)), "default": getattr(defaults, f.name)} for f in dataclasses.fields(cls.Params)]

    # -- what the runner calls --------------------------------------------------------------------

    def schedule(self, stage: Stage, n_steps: int) -> list[str]:
        """The data source of each optimizer step; ``n_steps`` counts passes over the primary data."""
        return [PRIMARY_SOURCE[stage]] * n_steps

    def step(self, ctx: StepContext, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step's update for a stage in ``self.stages``. Default: plain SFT."""
        from harmbench_ft.training.gradients import loss_gradient

        loss, grads = loss_gradient(ctx.model, ctx.params, batches)
        return StepResult(loss, grads)

    def post_finetune(self, ctx: PostContext) -> dict[str, Any]:
        """Edit the fine-tuned adapter in place (or keep edited full weights, see PostContext); return what the
        result should report: the edit's settings and stats."""
        return {}

    # -- state persisted with the fine-tuning artifact (so a resumed run can post-process) ----------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    # -- state carried from one training step to the next (saved in mid-stage checkpoints) ----------

    def step_state(self) -> dict[str, torch.Tensor]:
        """Everything the defense's steps carry from one step to the next, so that a stage resumed from a
        checkpoint continues exactly as if never stopped. A defense with such state must return it here."""
        return self.state_dict()

    def load_step_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


def check_defense_class(cls: type) -> None:
    """What registering a defense checks, so a broken plugin fails with its own name."""
    problems = []
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise UsageError(f"{cls!r} is not a subclass of harmbench_ft.Defense")
    if not isinstance(getattr(cls, "name", None), str):
        problems.append("no string 'name'")
    if not all(isinstance(s, Stage) for s in cls.stages):
        problems.append(f"stages must be Stage members, got {cls.stages!r}")
    unknown = [n for n in cls.needs if n not in DATA_SOURCES]
    if unknown:
        problems.append(f"needs {unknown} are not data sources {DATA_SOURCES}")
    if not dataclasses.is_dataclass(cls.Params):
        problems.append("Params must be a dataclass")
    if problems:
        raise UsageError(f"defense class {cls.__name__}: " + "; ".join(problems))


@contextlib.contextmanager
def no_op() -> Iterator[None]:
    yield
