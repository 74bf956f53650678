"""Planning a grid: runs sharing an artifact are grouped, the first builds it, the others wait for it."""

import json

from harmbench_ft.cli import main
from harmbench_ft.grid import load_grid, plan_grid
from harmbench_ft.runner import ARTIFACT_FILE
from rich.console import Console

GRID = """
preset = "tiny"
defenses = ["sft", "booster"]
ratios = [0.0, 0.1]
tasks = ["sst2"]
seeds = [0]
"""


def plan(tmp_path, shared_data, text=GRID):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return plan_grid(load_grid(path), tmp_path / "runs", str(shared_data), Console(quiet=True))


def test_the_first_run_of_an_artifact_builds_it_and_the_others_wait(tmp_path, shared_data):
    runs = plan(tmp_path, shared_data)
    assert [(r.index, r.spec.defense.name, r.spec.attack.ratio) for r in runs] == [(1, "sft", 0.0), (2, "sft", 0.1), (3, "booster", 0.0), (4, "booster", 0.1)]
    assert runs[0].keys["alignment"] == runs[1].keys["alignment"] != runs[2].keys["alignment"] == runs[3].keys["alignment"]
    assert [r.waits_for for r in runs] == [[], [1], [], [3]]
    assert not any(r.finished or any(r.ready.values()) for r in runs)
    assert runs[0].job() == {"spec": runs[0].spec.to_dict(), "runs_dir": str(tmp_path / "runs"), "data_dir": str(shared_data), "claimed": False}
    assert runs[0].spec.defense.args == {} and runs[2].spec.defense.args == {"lamb": 5.0, "alpha": 0.1}  # resolved


def test_existing_artifacts_and_results_are_not_waited_for(tmp_path, shared_data):
    runs = plan(tmp_path, shared_data)
    sft_alignment = runs[0].artifacts["alignment"]
    sft_alignment.mkdir(parents=True)
    (sft_alignment / ARTIFACT_FILE).write_text("{}")
    (runs[2].run_dir).mkdir(parents=True)
    (runs[2].run_dir / "result.json").write_text(json.dumps({"version": 1, "status": "finished", "run_id": runs[2].run_dir.name, "spec": {}, "metrics": {}}))
    runs = plan(tmp_path, shared_data)
    assert runs[0].ready["alignment"] and runs[1].ready["alignment"] and not runs[0].ready["finetune"]
    assert runs[2].finished and not runs[3].finished
    assert [r.waits_for for r in runs] == [[], [], [], []]  # run 3 is finished, so run 4 builds the booster alignment


def test_runs_sharing_an_alignment_are_grouped_across_axes(tmp_path, shared_data):
    text = 'preset = "tiny"\ndefenses = ["sft"]\nratios = [0.1]\ntasks = ["sst2", "agnews"]\nseeds = [0, 1]\n'
    runs = plan(tmp_path, shared_data, text)
    # expansion order is task, then seed; the alignment does not depend on the task, so seeds group
    assert [(r.spec.attack.task, r.spec.seed) for r in runs] == [("sst2", 0), ("agnews", 0), ("sst2", 1), ("agnews", 1)]
    assert [r.waits_for for r in runs] == [[], [1], [], [3]]


def test_dry_run_lists_runs_and_what_would_be_built_or_reused(tmp_path, shared_data, capsys):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    args = ["grid", str(path), "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(shared_data), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.count("← #1") == 1 and out.out.count("← #3") == 1 and out.out.count("build") == 6
    assert "4 runs, 0 already finished; 6 artifacts to build; nothing was run" in out.err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))
    alignment = plan(tmp_path, shared_data)[0].artifacts["alignment"]
    alignment.mkdir(parents=True)
    (alignment / ARTIFACT_FILE).write_text("{}")
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.count("reuse") == 2 and "5 artifacts to build" in out.err  # 6 minus the sft alignment


def test_dry_run_of_finished_runs_whose_artifacts_are_gone(tmp_path, shared_data, capsys):
    """A fresh machine with results copied from leaderboards/results: no artifacts, nothing to build for those runs."""
    runs = plan(tmp_path, shared_data)
    for run in runs[:2]:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "result.json").write_text(json.dumps({"version": 1, "status": "finished", "run_id": run.run_dir.name, "spec": {}, "metrics": {}}))
    path = tmp_path / "grid.toml"
    args = ["grid", str(path), "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(shared_data), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.count("not needed") == 4 and out.out.count("← #3") == 1  # sft's two runs: alignment and finetune each
    assert "4 runs, 2 already finished; 3 artifacts to build" in out.err
