"""The one training loop. Every stage of every defense runs through it; a defense changes the step.

Per optimizer step: draw the scheduled micro-batches, let the defense compute the update direction
(under bf16 autocast if asked), clip its global norm to max_grad_norm, and take an AdamW step.

Every ``checkpoint_every`` steps the whole state of the stage (trainable weights, optimizer, RNG, the
streams' positions, the defense's step state, the losses so far) is written atomically to the stage's
checkpoint folder; a stage started again with that folder resumes from it and ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harmbench_ft.defense import Stage, StepContext, StepResult
from harmbench_ft.spec import TrainConfig
from harmbench_ft.training.batches import BatchStream

StepFn = Callable[[StepContext, list], StepResult]


@dataclass
class TrainStats:
    steps: int
    seconds: float
    seconds_per_step: float
    first_loss: float
    last_loss: float
    metrics: dict[str, float]  # the mean over steps of each number the defense's steps reported
    resumed_from_step: int = 0  # the step a checkpoint let this stage start from (0: from the beginning)


CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Checkpoints:
    """Where and how often a stage checkpoints, and the defense whose step state goes with it."""

    folder: Path
    every: int
    defense: Any  # harmbench_ft.defense.Defense: step_state() / load_step_state()

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def save(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)  # a kill leaves the previous checkpoint or this one, never half of one

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=True)  # no pickled code, only tensors and plain values
        except Exception as exc:  # a damaged checkpoint costs the steps since the stage began, not the run
            Console(stderr=True).print(f"hft-bench: ignoring unreadable checkpoint {self.path} ({type(exc).__name__}); the stage starts over")
            return None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.2f} steps/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays clean for --json
    )


def train(
    model: torch.nn.Module,
    step_fn: StepFn,
    schedule: list[str],
    streams: dict[str, BatchStream],
    train_cfg: TrainConfig,
    stage: Stage,
    description: str = "training",
    checkpoints: Checkpoints | None = None,
) -> TrainStats:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)  # constant lr, as the reference scripts
    model.train()
    losses: list[float] = []
    metric_sums: dict[str, float] = {}
    first_step = 0
    saved = checkpoints.load() if checkpoints else None
    if saved is not None and not _fits(saved, params, streams, len(schedule)):
        Console(stderr=True).print(f"hft-bench: the checkpoint {checkpoints.path} does not fit this stage (other parameters, streams or schedule); the stage starts over")
        saved = None
    if saved is not None:
        first_step, losses, metric_sums = _restore(saved, params, optimizer, streams, checkpoints.defense)
    start = time.perf_counter()
    with progress_bar() as progress:
        bar = progress.add_task(description, total=len(schedule), loss=float("nan"), rate=0.0, completed=first_step)
        if first_step:
            progress.console.print(f"{description}: resumed from the checkpoint at step {first_step}/{len(schedule)}")
        for step, source in enumerate(schedule):
            if step < first_step:
                continue
            ctx = StepContext(model, params, names, stage, step, len(schedule), source, streams)
            batches = streams[source].next_step()
            with torch.autocast("cuda" if params[0].is_cuda else "cpu", dtype=torch.bfloat16, enabled=train_cfg.bf16):
                result = step_fn(ctx, batches)
            for p, g in zip(params, result.grads, strict=True):
                p.grad = g.to(p.dtype)
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(result.loss)
            for key, value in result.metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
            elapsed = time.perf_counter() - start
            done = step + 1 - first_step
            progress.update(bar, advance=1, loss=result.loss, rate=done / elapsed)
            if not progress.console.is_terminal and (step + 1) % max(1, len(schedule) // 10) == 0:
                # logs (CI, nohup) get a line every 10% instead of a live bar
                progress.console.print(f"{description}: step {step + 1}/{len(schedule)} loss {result.loss:.4f} {done / elapsed:.2f} steps/s")
            if checkpoints and checkpoints.every and (step + 1) % checkpoints.every == 0 and step + 1 < len(schedule):
                checkpoints.save(_state(step + 1, losses, metric_sums, params, optimizer, streams, checkpoints.defense))
    model.eval()
    seconds = time.perf_counter() - start
    steps_run = len(schedule) - first_step
    metrics = {key: total / len(schedule) for key, total in metric_sums.items()}
    return TrainStats(len(schedule), seconds, seconds / max(steps_run, 1), losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), metrics, first_step)


def _state(next_step: int, losses, metric_sums, params, optimizer, streams, defense) -> dict[str, Any]:
    return {
        "next_step": next_step,
        "losses": list(losses),
        "metric_sums": dict(metric_sums),
        "params": [p.detach().clone() for p in params],
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "streams": {name: stream.state() for name, stream in streams.items()},
        "defense": dict(defense.step_state()) if defense is not None else {},
    }


def _fits(saved: dict[str, Any], params, streams, n_steps: int) -> bool:
    try:
        shapes_match = len(saved["params"]) == len(params) and all(a.shape == p.shape for a, p in zip(saved["params"], params))
        return shapes_match and set(saved["streams"]) == set(streams) and 0 < saved["next_step"] < n_steps
    except (KeyError, TypeError, AttributeError):
        return False


def _restore(saved: dict[str, Any], params, optimizer, streams, defense) -> tuple[int, list[float], dict[str, float]]:
    """Put the stage back where the checkpoint was."""
    with torch.no_grad():
        for p, value in zip(params, saved["params"]):
            p.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    for name, stream in streams.items():
        stream.load_state(saved["streams"][name])
    if defense is not None:
        defense.load_step_state(saved["defense"])
    return saved["next_step"], list(saved["losses"]), dict(saved["metric_sums"])
