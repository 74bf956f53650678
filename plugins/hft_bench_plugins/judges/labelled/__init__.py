"""The labelled answer set of the benchmark's own models and every built-in judge's measured agreement with it.

``answers.jsonl``: (prompt, response) pairs answered by hft-bench's models, each labelled under
docs/labelling.md (kind, harmful, who labelled it, train / held-out split; see README.md beside it).
``agreement.json``: each judge against the held-out split, written by ``benchmarks/judge_agreement.py --write``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

AGREEMENT_FILE = Path(__file__).with_name("agreement.json")


def measured_agreement(judge: str) -> dict[str, Any] | None:
    """A built-in judge's agreement with the held-out labelled answers, as last measured (None if never)."""
    if not AGREEMENT_FILE.is_file():
        return None
    saved = json.loads(AGREEMENT_FILE.read_text(encoding="utf-8"))
    entry = saved.get("judges", {}).get(judge)
    return {"set": saved["set"], **entry} if entry else None


class MeasuredAgreement:
    """Mixin for the built-in judges: ``agreement()`` reads the judge's entry of agreement.json."""

    name: str

    @classmethod
    def agreement(cls) -> dict[str, Any] | None:
        return measured_agreement(cls.name)
