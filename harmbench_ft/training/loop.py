"""The one training loop. Every stage of every defense runs through it; a defense changes the step.

Per optimizer step: draw the scheduled micro-batches, let the defense compute the update direction
(under bf16 autocast if asked), clip its global norm to max_grad_norm, and take an AdamW step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

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
) -> TrainStats:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)  # constant lr, as the reference scripts
    model.train()
    losses: list[float] = []
    metric_sums: dict[str, float] = {}
    start = time.perf_counter()
    with progress_bar() as progress:
        bar = progress.add_task(description, total=len(schedule), loss=float("nan"), rate=0.0)
        for step, source in enumerate(schedule):
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
            progress.update(bar, advance=1, loss=result.loss, rate=(step + 1) / elapsed)
            if not progress.console.is_terminal and (step + 1) % max(1, len(schedule) // 10) == 0:
                # logs (CI, nohup) get a line every 10% instead of a live bar
                progress.console.print(f"{description}: step {step + 1}/{len(schedule)} loss {result.loss:.4f} {(step + 1) / elapsed:.2f} steps/s")
    model.eval()
    seconds = time.perf_counter() - start
    metrics = {key: total / len(schedule) for key, total in metric_sums.items()}
    return TrainStats(len(schedule), seconds, seconds / max(len(schedule), 1), losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), metrics)
