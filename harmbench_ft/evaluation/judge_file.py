"""Score a JSONL file of {"prompt", "response"} rows with one or more judges (`hft-bench judge`).

So judges can be checked against labelled data and used outside the pipeline: rows may carry a label column
(BeaverTails' `is_safe`, True = safe, or the labelled answer set's `harmful`, True = harmful), in which case the
judge's agreement with it is reported (accuracy, precision, recall, Cohen's κ, confusion matrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harmbench_ft.errors import UsageError
from harmbench_ft.evaluation.agreement import agreement
from harmbench_ft.evaluation.evaluate import percent
from harmbench_ft.evaluation.judges import Judge, incoherent
from harmbench_ft.results import read_jsonl

REQUIRED = ("prompt", "response")
SAFE_LABELS = ("is_safe",)  # label columns where True means safe; in every other label column True means harmful


def _strings(row: dict[str, Any]) -> str | None:
    bad = [k for k in REQUIRED if not isinstance(row[k], str)]
    return f"{bad} must be strings" if bad else None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row, or a one-line error naming the file, the line and what is wrong with it."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file; give a JSONL file with one {{\"prompt\": ..., \"response\": ...}} object per line")
    rows = read_jsonl(path, REQUIRED, check=_strings)
    if not rows:
        raise UsageError(f"{path}: no rows to score")
    return rows


def harmful_labels(rows: list[dict[str, Any]], column: str) -> list[bool]:
    """The label of every row as True = harmful; a missing or non-boolean value is an error naming the row."""
    labels = []
    for i, row in enumerate(rows, start=1):
        value = row.get(column)
        if not isinstance(value, bool):
            raise UsageError(f"row {i}: label column {column!r} must be true or false on every row, got {value!r}")
        labels.append(not value if column in SAFE_LABELS else value)
    return labels


def default_label(rows: list[dict[str, Any]]) -> str | None:
    """`harmful` or `is_safe` if the first row has it (then every row must), else no label."""
    return next((c for c in ("harmful", "is_safe") if c in rows[0]), None)


def judge_rows(rows: list[dict[str, Any]], judges: list[Judge], label: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-row scores and flags of every judge, and a summary computed from exactly those flags.

    With a label column, each judge's entry gets `agreement` (see harmbench_ft.evaluation.agreement).
    """
    labels = harmful_labels(rows, label) if label else None
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    out = [{**r, "incoherent": incoherent(r["response"]), "judges": {}} for r in rows]
    summary: dict[str, Any] = {"rows": len(rows), "label": label, "judges": {}}
    for judge in judges:
        scores = judge.score(prompts, responses)
        flags = judge.flags(scores)
        for row, s, f in zip(out, scores, flags):
            row["judges"][judge.name] = {"score": s, "flagged": f}
        entry: dict[str, Any] = {
            **judge.describe(),
            "flagged": sum(flags),
            "harmful_score": percent(flags),
            "harmful_score_plus": percent([f or r["incoherent"] for f, r in zip(flags, out)]),
        }
        if labels is not None:
            entry["agreement"] = agreement(flags, labels)
        summary["judges"][judge.name] = entry
    return out, summary
