"""The grid files published under leaderboards/grids/ stay runnable as the code changes."""

from pathlib import Path

import pytest

from harmbench_ft.grid.gridfile import expand, load_grid
from harmbench_ft.runner import resolve

GRIDS = sorted((Path(__file__).parents[3] / "leaderboards" / "grids").glob("*.toml"))


def test_the_published_grids_are_found():
    assert len(GRIDS) >= 2, GRIDS


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_a_published_grid_expands_and_every_run_resolves(path):
    grid = load_grid(path)
    specs = expand(grid)
    assert len(specs) == len(grid.defenses) * len(grid.ratios) * len(grid.tasks) * len(grid.seeds)
    for spec in specs:
        resolve(spec)  # the runner's own check: raises UsageError on an unknown defense argument, task or judge


@pytest.mark.parametrize("name", ["cpu-v1-sst2.toml", "cpu-v1-sst2-seed1.toml"])
def test_the_v1_grids_still_name_exactly_the_recorded_runs(name):
    """Protocol v1 was renamed cpu-v1 when v2 became `cpu`: its grids must find its records, not redo them."""
    records = Path(__file__).parents[3] / "leaderboards" / "results"
    run_ids = [resolve(spec)[0].run_id() for spec in expand(load_grid(GRIDS[0].parent / name))]
    missing = [run_id for run_id in run_ids if not (records / run_id / "result.json").is_file()]
    assert not missing and len(run_ids) == len(set(run_ids))
