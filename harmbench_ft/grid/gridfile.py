"""Grid files: a TOML description of defense × ratio × task × model × n × seed, expanded to run specs.

Example (docs/grids.md has the full reference)::

    preset = "tiny"
    defenses = ["sft", "booster"]
    ratios = [0.0, 0.1]
    tasks = ["sst2"]
    seeds = [0, 1]
    model = "tiny-llama"            # optional: a name or a list of names (another axis)
    n = 20                          # optional: attack.n, a number or a list
    judges = ["keyword"]            # optional: every run is judged by all; the first is the headline HS

    [set]                           # optional: any spec field by dotted path (nested tables work too)
    "finetune.lr" = 1e-3

    [defense_args.booster]          # optional: arguments of one defense
    lamb = 5

    [resources]                     # optional: what one run needs from an executor that schedules (ray)
    cpus = 1
    gpus = 0
"""

from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmbench_ft.errors import UsageError
from harmbench_ft.spec import RunSpec, apply_overrides, preset

REQUIRED = ("preset", "defenses", "ratios", "tasks", "seeds")
OPTIONAL = ("model", "n", "judges", "set", "defense_args", "resources")
RESOURCE_KEYS = {"cpus": 1.0, "gpus": 0.0}
# Spec fields that the grid's own keys control; [set] may not touch them.
AXIS_PATHS = {
    "preset": "preset",
    "defense.name": "defenses",
    "defense.args": "[defense_args.<defense>]",
    "attack.ratio": "ratios",
    "attack.task": "tasks",
    "seed": "seeds",
    "model.name": "model",
    "attack.n": "n",
    "evaluation.judges": "judges",
}


@dataclass
class Grid:
    """A parsed grid file: the axes, the settings shared by every run, and per-defense arguments."""

    source: Path
    preset: str
    defenses: list[str]
    ratios: list[Any]
    tasks: list[str]
    seeds: list[Any]
    models: list[str] | None = None  # None: the preset's model
    ns: list[Any] | None = None  # None: the preset's attack.n
    judges: list[str] | None = None  # None: the preset's judges
    settings: dict[str, Any] = field(default_factory=dict)  # dotted path -> value, from [set]
    defense_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=lambda: dict(RESOURCE_KEYS))


def _axis(raw: dict[str, Any], key: str, where: str, scalar_ok: bool) -> list[Any] | None:
    """A non-empty list without duplicates (a scalar counts as a list of one where allowed)."""
    if key not in raw:
        return None
    value = raw[key]
    if scalar_ok and not isinstance(value, list):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: `{key}` must be a non-empty list, got {raw[key]!r}")
    duplicates = sorted({str(v) for v in value if value.count(v) > 1})
    if duplicates:
        raise UsageError(f"{where}: `{key}` lists {', '.join(duplicates)} more than once")
    return value


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"finetune": {"lr": 1}} and {"finetune.lr": 1} both become {"finetune.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_grid(raw: dict[str, Any], source: Path) -> Grid:
    where = str(source)
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UsageError(f"{where}: missing key(s) {', '.join(missing)}; a grid lists at least {', '.join(REQUIRED)}")
    if not isinstance(raw["preset"], str):
        raise UsageError(f"{where}: `preset` must be one preset name (a string), got {raw['preset']!r}")

    settings = _flatten(raw.get("set", {}))
    taken = sorted(p for p in settings if p in AXIS_PATHS or p.startswith("defense."))
    if taken:
        raise UsageError(f"{where}: [set] may not set {', '.join(taken)}; use the grid key(s) {', '.join(AXIS_PATHS.get(p, 'defenses') for p in taken)} instead")

    defenses = _axis(raw, "defenses", where, scalar_ok=False)
    defense_args = raw.get("defense_args", {})
    if not isinstance(defense_args, dict) or not all(isinstance(v, dict) for v in defense_args.values()):
        raise UsageError(f"{where}: [defense_args] must hold one table per defense, e.g. [defense_args.booster] lamb = 5")
    stray = sorted(set(defense_args) - set(defenses))
    if stray:
        raise UsageError(f"{where}: [defense_args] names defense(s) {', '.join(stray)} that `defenses` does not list ({', '.join(defenses)})")

    resources = dict(RESOURCE_KEYS)
    for key, value in raw.get("resources", {}).items():
        if key not in RESOURCE_KEYS:
            raise UsageError(f"{where}: [resources] has no key {key!r}; known: {', '.join(RESOURCE_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UsageError(f"{where}: [resources] {key} must be a number >= 0, got {value!r}")
        resources[key] = float(value)

    return Grid(
        source=source,
        preset=raw["preset"],
        defenses=defenses,
        ratios=_axis(raw, "ratios", where, scalar_ok=False),
        tasks=_axis(raw, "tasks", where, scalar_ok=False),
        seeds=_axis(raw, "seeds", where, scalar_ok=False),
        models=_axis(raw, "model", where, scalar_ok=True),
        ns=_axis(raw, "n", where, scalar_ok=True),
        judges=_axis(raw, "judges", where, scalar_ok=True),
        settings=settings,
        defense_args={name: dict(args) for name, args in defense_args.items()},
        resources=resources,
    )


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every problem is a UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"grid file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); TOML files are UTF-8") from None
    return parse_grid(raw, path)


def expand(grid: Grid) -> list[RunSpec]:
    """One spec per point of model × task × n × seed × defense × ratio (in that nesting order)."""
    try:
        base = apply_overrides(preset(grid.preset), grid.settings)  # reports bad [set] paths once, not per run
    except UsageError as exc:
        raise UsageError(f"{grid.source}: [set]: {exc}") from None
    specs = []
    for model, task, n, seed, defense, ratio in itertools.product(grid.models or [None], grid.tasks, grid.ns or [None], grid.seeds, grid.defenses, grid.ratios):
        overrides: dict[str, Any] = {"defense.name": defense, "attack.task": task, "attack.ratio": ratio, "seed": seed}
        if model is not None:
            overrides["model.name"] = model
        if n is not None:
            overrides["attack.n"] = n
        if grid.judges is not None:
            overrides["evaluation.judges"] = grid.judges
        try:
            spec = apply_overrides(base, overrides)
        except UsageError as exc:
            raise UsageError(f"{grid.source}: {exc}") from None
        spec.defense.args = dict(grid.defense_args.get(defense, {}))
        specs.append(spec)
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):  # e.g. ratios ["0.1", "1e-1"]: two entries, one run
        key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
        if key in seen:
            raise UsageError(f"{grid.source}: runs {seen[key] + 1} and {i + 1} are the same run ({spec.defense.name}, {spec.attack.task}, p={spec.attack.ratio:g}, seed {spec.seed}); list each value once")
        seen[key] = i
    return specs
