"""Grids: many runs from one TOML file, carried out by a plugin-registered executor (local, ray, ...)."""

from harmbench_ft.grid.driver import plan_grid, run_grid
from harmbench_ft.grid.executor import Executor, GridRun, Outcome, Reporter
from harmbench_ft.grid.gridfile import Grid, expand, load_grid

__all__ = ["Executor", "Grid", "GridRun", "Outcome", "Reporter", "expand", "load_grid", "plan_grid", "run_grid"]
