"""Frozen event records passed to lifecycle hooks; fields can be added without breaking plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunStart:
    run_id: str
    run_dir: Path
    spec: dict[str, Any]


@dataclass(frozen=True)
class RunEnd:
    run_id: str
    status: str  # "finished" or "failed"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class StageStart:
    run_id: str
    stage: str


@dataclass(frozen=True)
class StageEnd:
    run_id: str
    stage: str
    seconds: float
    reused: bool
