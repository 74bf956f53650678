"""The executor interface: how a grid's runs are carried out, and how one run is carried out anywhere.

The grid plans the runs (resolved specs, artifact keys, an order in which runs sharing an artifact are
adjacent, and for each run the earlier runs that build an artifact it reuses) and hands the runs still
to do to an executor. An executor decides where each run executes; every executor ends up calling
:meth:`Executor.run_here` in the process that does the work (a forked process for ``local``, a Ray worker
for ``ray``, a batch job for a third-party one), which takes the run's lock, sends its output to the run's
log and reports stage events.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol

from harmbench_ft import results
from harmbench_ft.errors import UsageError
from harmbench_ft.hookspecs import hookimpl
from harmbench_ft.spec import RunSpec, spec_from_dict

RUN_LOG = "run.log"  # everything the run printed, one header line per attempt
RUN_LOCK = "run.lock"  # held while a process works on the run: two grids never compute one run twice
ARTIFACT_STAGES = ("alignment", "finetune", "post_finetune")

Event = dict[str, Any]  # {"event": "stage_start" | "stage_end" | "waiting", ...}: JSON-able, so it crosses processes


@dataclass
class GridRun:
    """One planned run of a grid."""

    index: int  # 1-based position in the grid's order
    spec: RunSpec  # resolved (defense arguments filled with defaults)
    run_id: str
    runs_dir: Path
    data_dir: str | None
    keys: dict[str, str]  # stage -> artifact key (no post_finetune key if the defense does not edit)
    artifacts: dict[str, Path]  # stage -> artifact folder
    ready: dict[str, bool]  # stage -> the artifact existed when the grid was planned
    finished: bool  # the result existed when the grid was planned
    waits_for: list[int] = field(default_factory=list)  # earlier runs that build an artifact this run reuses
    resources: dict[str, float] = field(default_factory=dict)  # {"cpus": .., "gpus": ..} for executors that schedule

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id

    @property
    def log_path(self) -> Path:
        return self.run_dir / RUN_LOG

    @property
    def lock_path(self) -> Path:
        return self.run_dir / RUN_LOCK

    @property
    def label(self) -> str:
        return f"{self.spec.defense.name} · {self.spec.attack.task} · p={self.spec.attack.ratio:g} · seed {self.spec.seed}"

    def job(self, claimed: bool = False) -> dict[str, Any]:
        """What a process needs to carry out this run (JSON-able); ``claimed``: the caller holds the run's lock."""
        return {"spec": self.spec.to_dict(), "runs_dir": str(self.runs_dir), "data_dir": self.data_dir, "claimed": claimed}


@dataclass
class Outcome:
    """How a run of a grid ended: finished (computed now), reused (its result already existed) or failed."""

    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    built: list[str] = field(default_factory=list)  # stages whose artifact this run built

    def to_event(self) -> Event:
        return {"event": "outcome", **asdict(self)}

    @classmethod
    def from_event(cls, event: Event) -> Outcome:
        return cls(**{k: v for k, v in event.items() if k != "event"})


WAITING: Event = {"event": "waiting", "reason": "another process is working on this run"}


class Busy(Exception):
    """Another process holds the run's lock."""


def _busy() -> None:
    raise Busy


class Reporter(Protocol):
    """What an executor tells the grid (the grid shows it as progress)."""

    def run_started(self, run: GridRun) -> None: ...

    def run_event(self, run: GridRun, event: Event) -> None: ...

    def run_ended(self, run: GridRun, outcome: Outcome) -> None: ...


class Executor:
    """Base class of grid executors; register a subclass with ``hft_register_executors``.

    A subclass sets ``name`` and implements :meth:`run_all`. Runs come in the grid's order; a run must
    not start before the runs in its ``waits_for`` have ended (they build artifacts it reuses), unless
    the executor runs one run at a time in the given order. Each run is carried out by
    :meth:`run_here` in a process of the executor's choosing; a run that dies without an outcome is
    recorded with :meth:`record_failure`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    option_help: ClassVar[dict[str, str]] = {}  # option name -> what it means (the CLI passes these)
    Busy: ClassVar[type[Exception]] = Busy  # raised by claim() without `wait` when another process holds the run

    def __init__(self, **options: str) -> None:
        unknown = sorted(k for k, v in options.items() if k not in self.option_help and v is not None)
        if unknown:
            known = ", ".join(self.option_help) or "none"
            raise UsageError(f"executor {self.name!r} takes no option(s) {', '.join(unknown)}; its options: {known}")
        self.options = {k: v for k, v in options.items() if v is not None}

    def run_all(self, runs: list[GridRun], report: Reporter) -> list[Outcome]:
        """Carry out every run, report its start, events and end, and return one outcome per run."""
        raise NotImplementedError

    # -- tools for subclasses ----------------------------------------------------------------------

    @staticmethod
    def run_here(job: dict[str, Any], emit: Callable[[Event], None] = lambda event: None) -> Outcome:
        """Carry out one run in this process (see :func:`run_one`)."""
        return run_one(job, emit)

    @staticmethod
    def already_finished(run: GridRun) -> Outcome | None:
        """The run's ``reused`` outcome if its result exists now (say, another grid finished it)."""
        return finished_outcome(run.run_dir, run.run_id)

    @staticmethod
    def claim(run: GridRun, wait: Callable[[], None] | None = None) -> contextlib.AbstractContextManager:
        """Hold the run's lock for a ``with`` block, so that no other grid works on the run meanwhile.

        If another process holds it: with ``wait``, call it and wait for the lock; without, raise
        :class:`Busy` at once. A job carried out under the claim is marked ``run.job(claimed=True)``.
        """
        return results.file_lock(run.lock_path, on_wait=wait or _busy)

    @staticmethod
    def worker(job: dict[str, Any], emit: Callable[[Event], None], lifeline=None) -> int:
        """The body of a process started for one run: carry the job out (:meth:`run_here`), emit the
        outcome as the last event, return the exit code (1: failed). ``lifeline``: the reading end of a
        pipe (``multiprocessing.Connection``) whose writer the grid holds; the process exits when it closes,
        so a killed grid leaves no run computing."""
        if lifeline is not None:
            exit_when_closed(lifeline)
        outcome = run_one(job, emit)
        emit(outcome.to_event())
        return 1 if outcome.status == "failed" else 0

    @staticmethod
    def record_failure(run: GridRun, error: str) -> Outcome:
        """Record a run that died without reporting (segfault, OOM kill, lost worker) in its error.json."""
        log = run.log_path
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]) if log.is_file() else ""
        write_error(run.run_dir, run.run_id, run.spec.to_dict(), error, f"last lines of {log}:\n{tail}")
        return Outcome(run.run_id, "failed", error=error)

    @staticmethod
    def describe_exit(code: int) -> str:
        """A child's exit code in words: 'was killed by SIGSEGV' or 'exited with code 3'."""
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


def exit_when_closed(lifeline) -> None:
    """Exit as soon as the writing end of ``lifeline`` is closed: its holder (the grid) is gone."""

    def watch() -> None:
        try:
            while True:
                lifeline.recv()
        except (EOFError, OSError):
            os._exit(137)  # no cleanup: a half-built artifact stays a .tmp folder, which is never reused

    threading.Thread(target=watch, name="exit-when-grid-dies", daemon=True).start()


def finished_outcome(run_dir: Path, run_id: str) -> Outcome | None:
    """The ``reused`` outcome of a run whose result exists (finished earlier, or by another grid)."""
    record = results.read_result(run_dir)
    return None if record is None else Outcome(run_id, "reused", record["metrics"])


def write_error(run_dir: Path, run_id: str, spec: dict[str, Any], error: str, details: str) -> None:
    """error.json in the runner's format."""
    results.write_json(run_dir / results.ERROR_FILE, {"version": results.RESULT_VERSION, "status": "failed", "run_id": run_id, "spec": spec, "error": error, "traceback": details})


# -------------------------------------------------------------------------------------------------
# One run, in whatever process an executor chose
# -------------------------------------------------------------------------------------------------


def run_one(job: dict[str, Any], emit: Callable[[Event], None]) -> Outcome:
    """Carry out one run under its lock (unless the caller holds it: ``job["claimed"]``); its output goes
    to ``<run>/run.log``, its stage events to ``emit``.

    A run whose result exists by the time the lock is held (another grid finished it) is ``reused``;
    an exception is a ``failed`` outcome with error.json written, not an exception.
    """
    from harmbench_ft.runner import Runner  # torch: imported only where a run is carried out

    spec = spec_from_dict(job["spec"])
    runs_dir = Path(job["runs_dir"])
    run_id = spec.run_id()
    run_dir = runs_dir / run_id
    start = time.perf_counter()
    held_by_caller = job.get("claimed", False)
    with contextlib.nullcontext() if held_by_caller else results.file_lock(run_dir / RUN_LOCK, on_wait=lambda: emit(WAITING)):
        done = finished_outcome(run_dir, run_id)
        if done is not None:
            return done
        (run_dir / results.ERROR_FILE).unlink(missing_ok=True)  # a stale error from an earlier attempt
        with _output_to(run_dir / RUN_LOG), _forward_stage_events(emit):
            print(f"=== attempt of {run_id} started {dt.datetime.now().isoformat(timespec='seconds')} (pid {os.getpid()})", flush=True)
            try:
                record = Runner(runs_dir, job["data_dir"]).run(spec)
            except Exception as exc:
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"
                if not (run_dir / results.ERROR_FILE).is_file():  # the runner writes it once the stages began
                    write_error(run_dir, run_id, spec.to_dict(), error, traceback.format_exc())
                return Outcome(run_id, "failed", error=error, seconds=round(time.perf_counter() - start, 2))
    built = [s for s in ARTIFACT_STAGES if s in record["stages"] and not record["stages"][s]["reused"] and not record["stages"][s].get("skipped")]
    return Outcome(run_id, "finished", record["metrics"], seconds=round(time.perf_counter() - start, 2), built=built)


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[None]:
    """Send this process's output to the log: file descriptors 1 and 2 (C code, child processes) and
    sys.stdout/sys.stderr (which a host such as pytest may have pointed elsewhere)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    try:
        with open(log_path, "a", encoding="utf-8", buffering=1) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = log
            try:
                yield
            finally:
                sys.stdout, sys.stderr = saved_streams
                os.dup2(saved_fds[0], 1)
                os.dup2(saved_fds[1], 2)
    finally:
        os.close(saved_fds[0])
        os.close(saved_fds[1])


class _StageEvents:
    """An in-process plugin that turns the runner's lifecycle hooks into grid events."""

    def __init__(self, emit: Callable[[Event], None]) -> None:
        self.emit = emit

    @hookimpl
    def hft_stage_start(self, event) -> None:
        self.emit({"event": "stage_start", "stage": event.stage})

    @hookimpl
    def hft_stage_end(self, event) -> None:
        self.emit({"event": "stage_end", "stage": event.stage, "seconds": event.seconds, "reused": event.reused})


@contextlib.contextmanager
def _forward_stage_events(emit: Callable[[Event], None]) -> Iterator[None]:
    from harmbench_ft.plugins import register_plugin, unregister_plugin

    name = f"grid-events-{os.getpid()}-{id(emit)}"
    register_plugin(_StageEvents(emit), name=name)
    try:
        yield
    finally:
        unregister_plugin(name)
