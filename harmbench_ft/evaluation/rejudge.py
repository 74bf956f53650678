"""Re-score a finished run's stored answers with any judge, without regenerating (`hft-bench rejudge`).

A judge change must not cost a retrain: every harmful-prompt answer is in ``generations.jsonl``, so a new
judge's HS and HS+ are computed from those answers and written into the run's record as
``metrics["harmful_score/<judge>"]`` and ``metrics["harmful_score_plus/<judge>"]``, with the judge's
description under ``rejudged[<judge>]``. The spec, the run id and the headline ``harmful_score`` (the
spec's first judge) stay as they were, so the run is still the same run; leaderboards pick the judge to
head a table with ``--judge``. Both files are rewritten atomically; generations first, so a record never
names a judge whose flags are not stored.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from harmbench_ft import results
from harmbench_ft.errors import UsageError
from harmbench_ft.evaluation.evaluate import percent
from harmbench_ft.evaluation.judges import Judge


def read_generations(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / results.GENERATIONS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir.name}: no {results.GENERATIONS_FILE}; its answers were not stored, so it cannot be re-judged (rerun it)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{lineno}: not valid JSON; the stored answers are damaged (rerun the run)") from None
    return rows


def rejudge_run(run_dir: Path, judges: list[Judge]) -> dict[str, Any]:
    """Score the run's stored harmful-prompt answers with every judge; return the updated record."""
    record = results.read_result(run_dir)
    if record is None or record.get("status") != "finished":
        raise UsageError(f"{run_dir}: not a finished run (no result.json with status finished)")
    samples = read_generations(run_dir)
    harmful = [s for s in samples if s.get("kind") == "harmful"]
    expected = record.get("data", {}).get("n_hs_prompts")
    if expected is not None and len(harmful) != expected:
        raise UsageError(f"{run_dir.name}: {results.GENERATIONS_FILE} holds {len(harmful)} harmful-prompt answers but the record says {expected}")
    questions = [s["question"] for s in harmful]
    responses = [s["response"] for s in harmful]
    rejudged = record.setdefault("rejudged", {})
    for judge in judges:
        scores = judge.score(questions, responses)
        flags = judge.flags(scores)
        for sample, score, flag in zip(harmful, scores, flags):
            sample["judges"][judge.name] = {"score": score, "flagged": flag}
        record["metrics"][f"harmful_score/{judge.name}"] = percent(flags)
        record["metrics"][f"harmful_score_plus/{judge.name}"] = percent([f or s["incoherent"] for f, s in zip(flags, harmful)])
        rejudged[judge.name] = {**judge.describe(), "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    results.write_jsonl(run_dir / results.GENERATIONS_FILE, samples)
    results.write_json(run_dir / results.RESULT_FILE, record)
    return record


def run_dirs(runs_dir: Path) -> list[Path]:
    """Every run folder under a runs directory that holds a result record (artifacts are not runs)."""
    return sorted(p.parent for p in Path(runs_dir).glob(f"*/{results.RESULT_FILE}"))
