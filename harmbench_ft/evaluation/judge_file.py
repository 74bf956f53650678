"""Score a JSONL file of {"prompt", "response"} rows with one or more judges (`hft-bench judge`).

So judges can be checked against labelled data and used outside the pipeline: rows may carry a BeaverTails
`is_safe` label, in which case agreement with it is reported too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harmbench_ft.errors import UsageError
from harmbench_ft.evaluation.evaluate import percent
from harmbench_ft.evaluation.judges import Judge, incoherent

REQUIRED = ("prompt", "response")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row, or a one-line error naming the file, the line and what is wrong with it."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file; give a JSONL file with one {{\"prompt\": ..., \"response\": ...}} object per line")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object with keys {list(REQUIRED)}, got {type(row).__name__}")
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise UsageError(f"{path}:{lineno}: missing key(s) {missing}; every row needs {list(REQUIRED)} (has {sorted(row)})")
            bad = [k for k in REQUIRED if not isinstance(row[k], str)]
            if bad:
                raise UsageError(f"{path}:{lineno}: {bad} must be strings")
            rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no rows to score")
    return rows


def judge_rows(rows: list[dict[str, Any]], judges: list[Judge]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-row scores and flags of every judge, and a summary computed from exactly those flags."""
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    out = [{**r, "incoherent": incoherent(r["response"]), "judges": {}} for r in rows]
    summary: dict[str, Any] = {"rows": len(rows), "judges": {}}
    labelled = all(isinstance(r.get("is_safe"), bool) for r in rows)
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
        if labelled:  # BeaverTails-style labels: how often the judge agrees with the humans
            entry["agreement_with_is_safe"] = percent([f == (not r["is_safe"]) for f, r in zip(flags, rows)])
        summary["judges"][judge.name] = entry
    return out, summary
