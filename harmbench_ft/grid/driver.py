"""Run a grid: plan it, skip what is finished, hand the rest to an executor, show progress, summarise.

Planning resolves every spec and computes its artifact keys without training (``Runner.prepare``), so a
bad grid fails before anything runs, ``--dry-run`` can say what would be built or reused, and runs
sharing an artifact can be ordered next to each other: the first of them builds it, the others wait
for that run (``GridRun.waits_for``) instead of racing it.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from harmbench_ft import results
from harmbench_ft.grid.executor import ARTIFACT_STAGES, Event, GridRun, Outcome
from harmbench_ft.grid.gridfile import Grid, expand
from harmbench_ft.plugins import get_registry

STAGE_COUNT = 4  # alignment, finetune, post_finetune, evaluation: the in-flight bar's steps


def plan_grid(grid: Grid, runs_dir: Path, data_dir: str | None, console: Console) -> list[GridRun]:
    """Resolve every run of the grid, order runs sharing an artifact together, and note who builds what."""
    from harmbench_ft.runner import Runner

    runner = Runner(runs_dir, data_dir, console)
    specs = expand(grid)
    planned: dict[str, GridRun] = {}
    with console.status(f"planning {len(specs)} runs of {grid.source}"):
        for spec in specs:
            spec, _, data, plan = runner.prepare(spec)
            keys = {"alignment": plan.alignment, "finetune": plan.finetune}
            if plan.post_finetune is not None:
                keys["post_finetune"] = plan.post_finetune
            artifacts = {stage: runner.artifact_dir(stage, key) for stage, key in keys.items()}
            run_id = spec.run_id()
            finished = runner.finished_result(runner.run_dir(spec), data) is not None
            if not finished:
                runner.check_model_settings(spec)  # a bad LoRA target stops the grid before any run starts
            planned.setdefault(run_id, GridRun(
                index=0, spec=spec, run_id=run_id, runs_dir=Path(runs_dir), data_dir=None if data_dir is None else str(data_dir),
                keys=keys, artifacts=artifacts, ready={stage: runner.artifact_ready(path) for stage, path in artifacts.items()},
                finished=finished, resources=dict(grid.resources),
            ))

    # Group runs by alignment, then by fine-tuning artifact, keeping the grid's order otherwise.
    runs = list(planned.values())
    first_seen: dict[str, int] = {}
    for run in runs:
        for stage in ("alignment", "finetune"):
            first_seen.setdefault(run.keys[stage], len(first_seen))
    runs.sort(key=lambda r: (first_seen[r.keys["alignment"]], first_seen[r.keys["finetune"]]))

    for index, run in enumerate(runs, start=1):
        run.index = index
    builder = builders(runs)
    for run in runs:
        if not run.finished:
            run.waits_for = sorted({builder[stage, key] for stage, key in run.keys.items() if not run.ready[stage]} - {run.index})
    return runs


def builders(runs: list[GridRun]) -> dict[tuple[str, str], int]:
    """(stage, artifact key) -> index of the first unfinished run that needs the missing artifact: its builder."""
    builder: dict[tuple[str, str], int] = {}
    for run in runs:
        if not run.finished:
            for stage, key in run.keys.items():
                if not run.ready[stage]:
                    builder.setdefault((stage, key), run.index)
    return builder


# -------------------------------------------------------------------------------------------------
# Progress: the grid's bar and one bar per run in flight
# -------------------------------------------------------------------------------------------------


class GridProgress:
    """The executor's reporter: rich bars in a terminal, one line per run start and end everywhere."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        self.total = total
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.grid = self.progress.add_task("[bold]grid", total=total, completed=done)
        self.bars: dict[int, int] = {}

    def __enter__(self) -> GridProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def run_started(self, run: GridRun) -> None:
        self.bars[run.index] = self.progress.add_task(f"#{run.index} {run.label}: queued", total=STAGE_COUNT)
        self.progress.console.print(f"[{run.index}/{self.total}] start   {run.label}  ({run.run_id})", highlight=False, soft_wrap=True)

    def run_event(self, run: GridRun, event: Event) -> None:
        bar = self.bars.get(run.index)
        if bar is None:
            return
        if event["event"] == "stage_start":
            self.progress.update(bar, description=f"#{run.index} {run.label}: {event['stage']}")
        elif event["event"] == "stage_end":
            self.progress.advance(bar)
        elif event["event"] == "waiting":
            self.progress.update(bar, description=f"#{run.index} {run.label}: waiting ({event['reason']})")

    def run_ended(self, run: GridRun, outcome: Outcome) -> None:
        if run.index in self.bars:
            self.progress.remove_task(self.bars.pop(run.index))
        self.progress.advance(self.grid)
        if outcome.status == "failed":
            note = f"[red]failed[/red]: {outcome.error}  (see {run.run_dir / 'error.json'})"
        else:
            note = f"{outcome.status}  HS {_metric(outcome, 'harmful_score')}  FA {_metric(outcome, 'finetune_accuracy')}  {outcome.seconds:.0f}s"
        self.progress.console.print(f"[{run.index}/{self.total}] {note}  {run.label}", highlight=False, soft_wrap=True)


def _metric(outcome: Outcome, name: str) -> str:
    value = outcome.metrics.get(name)
    return "–" if value is None else f"{value:.1f}"


# -------------------------------------------------------------------------------------------------
# Tables
# -------------------------------------------------------------------------------------------------


def plan_table(runs: list[GridRun]) -> Table:
    """--dry-run: each run, whether it will run (or is done), and per stage: reuse, build, ← #i (built by run i), or
    not needed (a finished run whose artifact is gone, as on a fresh machine with results copied from leaderboards/)."""
    builder = builders(runs)
    table = Table(title="grid plan")
    for col in ("#", "defense", "task", "p", "seed", "result", "alignment", "finetune", "post-ft"):
        table.add_column(col, no_wrap=col not in ("defense", "task"))
    for run in runs:
        cells = []
        for stage in ARTIFACT_STAGES:
            if stage not in run.keys:
                cells.append("–")
            elif run.ready[stage]:
                cells.append("[green]reuse[/green]")
            elif run.finished:
                cells.append("not needed")  # its result stands; an artifact deleted since is not rebuilt for it
            elif builder.get((stage, run.keys[stage])) == run.index:
                cells.append("[yellow]build[/yellow]")
            else:
                cells.append(f"← #{builder[stage, run.keys[stage]]}")
        result = "[green]done[/green]" if run.finished else "run"
        spec = run.spec
        table.add_row(str(run.index), spec.defense.name, spec.attack.task, f"{spec.attack.ratio:g}", str(spec.seed), result, *cells)
    return table


def summary_table(runs: list[GridRun], outcomes: dict[str, Outcome]) -> Table:
    table = Table(title="grid summary")
    for col, justify in (("#", "right"), ("run", "left"), ("status", "left"), ("HS", "right"), ("FA", "right"), ("seconds", "right"), ("built", "left")):
        table.add_column(col, justify=justify)
    colour = {"finished": "green", "reused": "cyan", "failed": "red"}
    for run in runs:
        outcome = outcomes[run.run_id]
        status = f"[{colour[outcome.status]}]{outcome.status}[/]"
        if outcome.error:
            status += f"\n{outcome.error[:200]}"
        table.add_row(str(run.index), run.label, status, _metric(outcome, "harmful_score"), _metric(outcome, "finetune_accuracy"), f"{outcome.seconds:.0f}", ", ".join(outcome.built) or "–")
    return table


def counts(outcomes: dict[str, Outcome]) -> str:
    statuses = [o.status for o in outcomes.values()]
    return " · ".join(f"{s} {statuses.count(s)}" for s in ("finished", "reused", "failed"))


# -------------------------------------------------------------------------------------------------
# The grid command
# -------------------------------------------------------------------------------------------------


def run_grid(grid: Grid, executor: str = "local", options: dict[str, str] | None = None, runs_dir: str | Path = "runs", data_dir: str | None = None, dry_run: bool = False, console: Console | None = None, out: Console | None = None) -> int:
    """Plan the grid and run what is not finished; returns the exit code (1 if any run failed)."""
    console = console or Console(stderr=True)  # progress and messages
    out = out or Console()  # tables
    executor_obj = get_registry().get("executors", executor)(**(options or {}))  # bad names/options fail before planning
    runs_dir = Path(runs_dir)
    runs = plan_grid(grid, runs_dir, data_dir, console)
    if dry_run:
        out.print(plan_table(runs))
        console.print(f"{len(runs)} runs, {sum(r.finished for r in runs)} already finished; {len(builders(runs))} artifacts to build; nothing was run (--dry-run)", highlight=False, soft_wrap=True)
        return 0

    outcomes = {r.run_id: Outcome(r.run_id, "reused", results.read_result(r.run_dir)["metrics"]) for r in runs if r.finished}
    todo = [r for r in runs if not r.finished]
    if not todo:
        out.print(summary_table(runs, outcomes))
        console.print(f"all {len(runs)} runs of {grid.source} already finished in {runs_dir}; nothing to do", highlight=False, soft_wrap=True)
        return 0
    results.writable_dir(runs_dir, "runs directory")  # before any run starts, not once per run in its own process
    console.print(f"grid {grid.source}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run with executor {executor!r}", highlight=False, soft_wrap=True)
    with GridProgress(console, len(runs), done=len(runs) - len(todo)) as reporter:
        for outcome in executor_obj.run_all(todo, reporter):
            outcomes[outcome.run_id] = outcome
    for run in todo:  # an executor that lost a run must not make it look finished
        outcomes.setdefault(run.run_id, Outcome(run.run_id, "failed", error=f"executor {executor!r} reported no outcome"))
    out.print(summary_table(runs, outcomes))
    console.print(f"{counts(outcomes)}; results in {runs_dir}; render tables with: hft-bench leaderboard --runs-dir {runs_dir}", highlight=False, soft_wrap=True)
    return 1 if any(o.status == "failed" for o in outcomes.values()) else 0
