"""Carrying out runs: the local executor isolates each run in a child process, run_one locks, logs and reports."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harmbench_ft import GridRun, results
from harmbench_ft.grid.executor import RUN_LOCK, exit_when_closed, run_one
from harmbench_ft.plugins import get_registry
from harmbench_ft.runner import Runner
from harmbench_ft.spec import apply_overrides, preset, spec_from_dict

REPO = Path(__file__).resolve().parents[3]

def fake_work(job, events, lifeline):
    """Stands in for a run's process: finishes (seed 0, 3), segfaults (seed 1) or exits with 3 (seed 2)."""
    seed = job["spec"]["seed"]
    run_dir = Path(job["runs_dir"]) / spec_from_dict(job["spec"]).run_id()
    with open(run_dir / "run.log", "a") as log:
        print("fake worker for seed", seed, file=log)
    if seed == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    if seed == 2:
        sys.exit(3)
    events.send({"event": "stage_start", "stage": "alignment"})
    events.send({"event": "stage_end", "stage": "alignment", "seconds": 0.1, "reused": False})
    events.send({"event": "outcome", "run_id": "fake", "status": "finished", "metrics": {"harmful_score": 12.5}, "error": None, "seconds": 0.5, "built": ["alignment"]})


class Recorder:
    def __init__(self):
        self.calls = []

    def run_started(self, run):
        self.calls.append(("started", run.index))

    def run_event(self, run, event):
        self.calls.append(("event", run.index, event["event"], event.get("stage")))

    def run_ended(self, run, outcome):
        self.calls.append(("ended", run.index, outcome.status))


def grid_run(runs_dir: Path, index: int, data_dir=None, **overrides) -> GridRun:
    spec = apply_overrides(preset("tiny"), overrides)
    return GridRun(index=index, spec=spec, run_id=spec.run_id(), runs_dir=runs_dir, data_dir=data_dir, keys={}, artifacts={}, ready={}, finished=False)


def test_local_executor_records_a_crashed_run_and_goes_on(tmp_path, monkeypatch):
    executor_cls = get_registry().get("executors", "local")
    monkeypatch.setattr(sys.modules[executor_cls.__module__], "work", fake_work)
    runs = [grid_run(tmp_path, i + 1, seed=seed) for i, seed in enumerate((0, 1, 2, 3))]
    recorder = Recorder()
    outcomes = executor_cls().run_all(runs, recorder)

    assert [o.status for o in outcomes] == ["finished", "failed", "failed", "finished"]
    assert outcomes[0].metrics == {"harmful_score": 12.5} and outcomes[0].built == ["alignment"]
    assert "was killed by SIGSEGV" in outcomes[1].error and "exited with code 3" in outcomes[2].error
    for run in runs[1:3]:
        error = json.loads((run.run_dir / "error.json").read_text())
        assert error["status"] == "failed" and error["run_id"] == run.run_id and error["spec"]["seed"] == run.spec.seed
        assert f"fake worker for seed {run.spec.seed}" in error["traceback"]  # the tail of the run's log
    assert not (runs[0].run_dir / "error.json").exists()
    assert recorder.calls[:4] == [("started", 1), ("event", 1, "stage_start", "alignment"), ("event", 1, "stage_end", "alignment"), ("ended", 1, "finished")]
    assert [c for c in recorder.calls if c[0] == "ended"] == [("ended", 1, "finished"), ("ended", 2, "failed"), ("ended", 3, "failed"), ("ended", 4, "finished")]


def test_local_executor_takes_first_the_runs_no_other_grid_is_working_on(tmp_path, monkeypatch):
    import fcntl

    executor_cls = get_registry().get("executors", "local")
    monkeypatch.setattr(sys.modules[executor_cls.__module__], "work", fake_work)
    first, second = grid_run(tmp_path, 1, seed=0), grid_run(tmp_path, 2, seed=3)
    first.run_dir.mkdir(parents=True)
    held = open(first.lock_path, "a+")  # another grid is working on run 1
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)

    class ReleaseLater(Recorder):
        def run_started(self, run):
            super().run_started(run)
            if run.index == 1:  # the other grid finishes a moment after we started waiting
                threading.Timer(0.5, held.close).start()

    recorder = ReleaseLater()
    outcomes = executor_cls().run_all([first, second], recorder)
    assert [o.status for o in outcomes] == ["finished", "finished"]
    started = [c[1] for c in recorder.calls if c[0] == "started"]
    assert started == [2, 1]
    assert recorder.calls[recorder.calls.index(("started", 1)) + 1] == ("event", 1, "waiting", None)


SMALL = {"alignment.n_alignment": 8, "attack.n": 8, "evaluation.n_harmful_prompts": 4, "evaluation.n_task_test": 4}


def test_run_one_logs_reports_stages_records_failure_and_resumes(tmp_path, shared_data, monkeypatch, capfd):
    run = grid_run(tmp_path, 1, str(shared_data), **SMALL)
    events = []

    def crash(*args, **kwargs):
        print("about to crash")
        raise RuntimeError("fine-tuning exploded")

    monkeypatch.setattr(Runner, "_train_finetune", crash)
    failed = run_one(run.job(), events.append)
    assert failed.status == "failed" and failed.error == "RuntimeError: fine-tuning exploded"
    assert json.loads((run.run_dir / "error.json").read_text())["error"] == failed.error
    log = run.log_path.read_text()
    assert "about to crash" in log and "Traceback" in log and "fine-tuning exploded" in log
    monkeypatch.undo()

    events.clear()
    outcome = run_one(run.job(), events.append)
    assert outcome.status == "finished" and outcome.built == ["finetune"]  # the alignment survived the crash
    assert 0 <= outcome.metrics["harmful_score"] <= 100
    assert [(e["event"], e["stage"]) for e in events] == [(kind, stage) for stage in ("alignment", "finetune", "post_finetune", "evaluation") for kind in ("stage_start", "stage_end")]
    assert not (run.run_dir / "error.json").exists()
    log = run.log_path.read_text()
    assert log.count("=== attempt of ") == 2 and "finetune (sft): step" in log
    assert capfd.readouterr().out == ""  # everything the run printed went to its log

    again = run_one(run.job(), events.append)
    assert again.status == "reused" and again.metrics == outcome.metrics
    assert run.log_path.read_text().count("=== attempt of ") == 2


def test_run_one_waits_for_a_run_held_by_another_process_and_does_not_redo_it(tmp_path):
    run = grid_run(tmp_path, 1)
    run.run_dir.mkdir(parents=True)
    events, box = [], {}
    with open(run.run_dir / RUN_LOCK, "a+") as held:  # another grid's worker, as far as flock can tell
        import fcntl

        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: box.setdefault("outcome", run_one(run.job(), events.append)))
        thread.start()
        deadline = time.time() + 60
        while not events and time.time() < deadline:
            time.sleep(0.05)
        assert events and events[0]["event"] == "waiting" and thread.is_alive()
        results.write_json(run.run_dir / "result.json", {"version": 1, "status": "finished", "run_id": run.run_dir.name, "spec": {}, "metrics": {"harmful_score": 1.0}})
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    thread.join(60)
    assert box["outcome"].status == "reused" and box["outcome"].metrics == {"harmful_score": 1.0}
    assert not run.log_path.exists()  # it never started an attempt


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie nobody reaped is dead too


def sleeping_work(events, lifeline):
    """A run's process that never ends by itself."""
    exit_when_closed(lifeline)
    events.send(os.getpid())
    time.sleep(120)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_run_process_dies_with_its_grid():
    grid = textwrap.dedent(
        f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.unit.grid.test_executors import sleeping_work
        context = multiprocessing.get_context("forkserver")  # as the local executor starts runs
        receiver, sender = context.Pipe(duplex=False)
        lifeline, held = context.Pipe(duplex=False)
        context.Process(target=sleeping_work, args=(sender, lifeline)).start()
        print(receiver.recv(), flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", grid], stdout=subprocess.PIPE, text=True)
    run_pid = int(proc.stdout.readline())
    assert _alive(run_pid)
    proc.kill()  # SIGKILL: the grid cannot tell anyone, but the kernel closes its end of the lifeline
    proc.wait()
    deadline = time.time() + 10
    while _alive(run_pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(run_pid)


def test_the_ray_executor_says_how_to_install_ray(monkeypatch):
    from harmbench_ft.errors import UsageError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(UsageError, match=r"needs Ray, which is not installed: pip install 'hft-bench\[ray\]'"):
        get_registry().get("executors", "ray")().run_all([], Recorder())
