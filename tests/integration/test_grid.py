"""Grids on the tiny preset with real data: concurrent grids, SIGKILL and resume, the Ray executor.

One grid (sft and random-perturbation × p ∈ {0, 0.2} × seeds {0, 1}) is run three ways: by two grid
processes at once on one runs directory (the reference), by a grid killed with SIGKILL at several
moments and rerun, and (seed 0) by the Ray executor on a local Ray cluster. Results must agree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from harmbench_ft import results
from harmbench_ft.leaderboard import write_leaderboards
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration

GRID = """
preset = "tiny"
defenses = ["sft", "random-perturbation"]
ratios = [0.0, 0.2]
tasks = ["sst2"]
seeds = {seeds}
n = 12

[set]
"alignment.n_alignment" = 8
"evaluation.n_harmful_prompts" = 4
"evaluation.n_task_test" = 4
"""
N_RUNS = 8
ARTIFACT_STAGES = ("alignment", "finetune", "post_finetune")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per run: fast on 2 shared cores, same numerics everywhere


def data_dir() -> Path:
    """The shared_data fixture's check, for module-scoped fixtures."""
    if not (SHARED_DATA / "stanfordnlp" / "sst2" / "train.jsonl").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the data mirror is missing at {SHARED_DATA}")
        pytest.skip(f"offline data mirror not found at {SHARED_DATA}")
    return SHARED_DATA


def write_grid(folder: Path, seeds=(0, 1)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grid.toml"
    path.write_text(GRID.format(seeds=list(seeds)))
    return path


def start_grid(grid: Path, runs: Path, log: Path) -> subprocess.Popen:
    """`hft-bench grid` in its own session, so SIGKILL to its group takes its worker with it, as a crash would."""
    cmd = [sys.executable, "-m", "harmbench_ft.cli", "grid", str(grid), "--runs-dir", str(runs), "--data-dir", str(data_dir())]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def result_files(runs: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs.glob("*/result.json")}


def check_consistent(runs: Path) -> None:
    """What a reader may see at any moment: only complete, finished results; only complete artifacts."""
    for path in runs.glob("*/result.json"):
        record = json.loads(path.read_text())  # never half-written
        assert record["status"] == "finished" and record["run_id"] == path.parent.name
    for folder in runs.glob("artifacts/*/*"):
        if folder.is_dir() and not folder.name.endswith(".tmp"):
            assert (folder / "artifact.json").is_file(), f"{folder} is in place but incomplete"


def check_each_artifact_built_once(runs: Path) -> None:
    builds: dict[str, int] = {}
    for record in results.iter_results(runs):
        for stage in ARTIFACT_STAGES:
            info = record["stages"][stage]
            if not info.get("skipped"):
                builds[info["artifact"]] = builds.get(info["artifact"], 0) + (not info["reused"])
    assert builds and all(count == 1 for count in builds.values()), builds
    on_disk = {str(p) for p in runs.glob("artifacts/*/*") if p.is_dir()}
    assert on_disk == set(builds)  # no leftover .tmp folders, nothing built that no result uses


def attempts(runs: Path) -> dict[str, int]:
    return {p.parent.name: p.read_text().count("=== attempt of ") for p in runs.glob("*/run.log")}


def leaderboard_numbers(runs: Path, out: Path) -> pd.DataFrame:
    write_leaderboards(runs, out)
    (csv,) = out.glob("*.csv")
    frame = pd.read_csv(csv)
    return frame[[c for c in frame.columns if not c.startswith("cost_")]]  # timings are never reproducible


def numbers(runs: Path) -> dict[str, tuple]:
    """Per run: the metrics and every training loss, which any nondeterminism would change."""
    out = {}
    for r in results.iter_results(runs):
        losses = tuple((s, r["stages"][s].get("first_loss"), r["stages"][s].get("last_loss")) for s in ("alignment", "finetune"))
        out[r["run_id"]] = (r["metrics"], losses)
    return out


@dataclass
class Reference:
    root: Path
    runs: Path
    grid: Path
    logs: list[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """Two grid processes started together on one runs directory, neither interrupted."""
    root = tmp_path_factory.mktemp("reference")
    grid, runs = write_grid(root), root / "runs"
    procs = [(start_grid(grid, runs, root / f"grid{i}.log"), root / f"grid{i}.log") for i in (1, 2)]
    logs = [finish(proc, log) for proc, log in procs]
    return Reference(root, runs, grid, logs)


def test_two_grids_on_one_runs_dir_split_nothing_twice(reference):
    runs = reference.runs
    check_consistent(runs)
    assert len(list(results.iter_results(runs))) == N_RUNS
    assert attempts(runs) == {r["run_id"]: 1 for r in results.iter_results(runs)}  # each run computed once
    check_each_artifact_built_once(runs)
    finished = [int(re.search(r"finished (\d+) · reused (\d+) · failed 0", log).group(1)) for log in reference.logs]
    assert sum(finished) == N_RUNS


def test_rerunning_a_finished_grid_does_nothing_and_says_so(reference):
    before = result_files(reference.runs)
    log = reference.root / "rerun.log"
    text = finish(start_grid(reference.grid, reference.runs, log), log)
    assert f"all {N_RUNS} runs of {reference.grid} already finished" in text.replace("\n", " ") and "nothing to do" in text
    assert result_files(reference.runs) == before


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the grid ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_killed_grid_resumes_without_losing_redoing_or_trusting_half_work(tmp_path, reference):
    grid, runs = write_grid(tmp_path), tmp_path / "runs"
    kept: dict[Path, tuple[int, bytes]] = {}
    unfinished_tmp: list[tuple[Path, float]] = []

    def mid_finetune() -> list[Path]:  # a fine-tuning artifact being trained (its adapter not yet saved)
        return [p for p in runs.glob("artifacts/finetune/*.tmp") if p.is_dir() and not (p / "adapter_model.safetensors").exists()]

    moments = {
        "the first alignment artifact": lambda: any(runs.glob("artifacts/alignment/*/artifact.json")),
        "mid-fine-tuning": lambda: bool(mid_finetune()),
        "a new result": lambda: len(list(runs.glob("*/result.json"))) > len(kept),
    }
    for i, (what, moment) in enumerate(moments.items()):
        proc = start_grid(grid, runs, tmp_path / f"killed{i}.log")
        wait_for(moment, proc, what)
        tmp_folders = mid_finetune()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
        time.sleep(0.5)  # let the kernel reap the worker and release its locks
        check_consistent(runs)
        assert {p: kept[p] for p in kept} == {p: result_files(runs)[p] for p in kept}  # nothing finished was lost or rewritten
        kept = result_files(runs)
        kept_attempts = {p.parent.name: attempts(runs)[p.parent.name] for p in kept}
        if what == "mid-fine-tuning":
            unfinished_tmp = [(p, killed_at) for p in tmp_folders if p.exists()]
            assert unfinished_tmp, "the kill did not land mid-fine-tuning"
    assert 0 < len(kept) < N_RUNS

    finish(start_grid(grid, runs, tmp_path / "final.log"), tmp_path / "final.log")
    check_consistent(runs)
    assert {p: result_files(runs)[p] for p in kept} == kept  # not recomputed
    assert len(list(results.iter_results(runs))) == N_RUNS
    assert {run_id: attempts(runs)[run_id] for run_id in kept_attempts} == kept_attempts  # no attempt after a result
    for tmp, killed_at in unfinished_tmp:  # a half-trained folder is rebuilt, never promoted
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        assert not tmp.exists() and final.is_dir()
        assert all(f.stat().st_mtime > killed_at for f in final.iterdir())

    assert numbers(runs) == numbers(reference.runs)  # deterministic on CPU, killed or not
    pd.testing.assert_frame_equal(leaderboard_numbers(runs, tmp_path / "lb"), leaderboard_numbers(reference.runs, tmp_path / "lb_reference"))


class Recorder:
    def __init__(self):
        self.calls = []

    def run_started(self, run):
        self.calls.append(("started", run.index))

    def run_event(self, run, event):
        self.calls.append(("event", run.index))

    def run_ended(self, run, outcome):
        self.calls.append(("ended", run.index))


def test_ray_executor_on_a_local_ray_cluster(tmp_path, reference, monkeypatch):
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but ray is not installed (pip install 'ray[default]')")
        pytest.skip("ray is not installed")
    from rich.console import Console

    from harmbench_ft.grid import load_grid, plan_grid
    from harmbench_ft.plugins import get_registry

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = tmp_path / "runs"
    planned = plan_grid(load_grid(write_grid(tmp_path, seeds=[0])), runs, str(data_dir()), Console(quiet=True))
    assert [r.waits_for for r in planned] == [[], [1], [1], [1, 3]]  # sft builds; random-perturbation reuses its fine-tuning
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        recorder = Recorder()
        outcomes = get_registry().get("executors", "ray")().run_all(planned, recorder)
    finally:
        ray.shutdown()

    assert sorted(o.status for o in outcomes) == ["finished"] * 4
    calls = recorder.calls
    for run in planned:  # no run started before the runs that build its artifacts ended
        for dep in run.waits_for:
            assert calls.index(("ended", dep)) < calls.index(("started", run.index))
    assert ("event", 1) in calls  # stage events came back from the Ray workers
    check_consistent(runs)
    check_each_artifact_built_once(runs)
    reference_numbers = numbers(reference.runs)
    assert numbers(runs) == {run_id: reference_numbers[run_id] for run_id in numbers(runs)}
    assert "alignment (sft): step" in planned[0].log_path.read_text()  # a Ray worker's output goes to the run's log
