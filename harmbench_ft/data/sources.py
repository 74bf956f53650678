"""The registry of datasets in protocol.md and the one function that loads their rows.

Rows come from the Hugging Face hub through ``datasets``, or from an offline mirror folder laid out
as ``<hub_id>[/<config>]/<split>.jsonl`` with the hub's columns (``--data-dir`` or
``HFT_BENCH_DATA_DIR``). Either way the code downstream sees the same list of dicts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from harmbench_ft.errors import DataMissingError, UsageError
from harmbench_ft.results import read_jsonl

DATA_DIR_ENV = "HFT_BENCH_DATA_DIR"


@dataclass(frozen=True)
class DatasetSource:
    name: str
    hub_id: str
    split: str
    columns: tuple[str, ...]
    config: str | None = None
    url: str | None = None  # for data that is not a hub dataset: a JSON file loaded with datasets' "json" builder

    def mirror_path(self, data_dir: Path) -> Path:
        parts = [self.hub_id] + ([self.config] if self.config else [])
        return Path(data_dir).joinpath(*parts, f"{self.split}.jsonl")


_BT = ("prompt", "response", "category", "is_safe")
DATASETS: dict[str, DatasetSource] = {
    s.name: s
    for s in [
        DatasetSource("beavertails-330k-train", "PKU-Alignment/BeaverTails", "330k_train", _BT),
        DatasetSource("beavertails-330k-test", "PKU-Alignment/BeaverTails", "330k_test", _BT),
        DatasetSource("beavertails-30k-train", "PKU-Alignment/BeaverTails", "30k_train", _BT),
        DatasetSource("beavertails-30k-test", "PKU-Alignment/BeaverTails", "30k_test", _BT),
        DatasetSource(
            "safety-tuned-llamas",
            "vinid/safety-tuned-llamas",
            "safety_only",
            ("instruction", "input", "output"),
            url="https://raw.githubusercontent.com/vinid/safety-tuned-llamas/main/data/training/safety_only_data_Instructions.json",
        ),
        DatasetSource("sst2-train", "stanfordnlp/sst2", "train", ("idx", "sentence", "label")),
        DatasetSource("sst2-validation", "stanfordnlp/sst2", "validation", ("idx", "sentence", "label")),
        DatasetSource("agnews-train", "fancyzhx/ag_news", "train", ("text", "label")),
        DatasetSource("agnews-test", "fancyzhx/ag_news", "test", ("text", "label")),
        DatasetSource("gsm8k-train", "openai/gsm8k", "train", ("question", "answer"), config="main"),
        DatasetSource("gsm8k-test", "openai/gsm8k", "test", ("question", "answer"), config="main"),
        DatasetSource("alpaca-train", "tatsu-lab/alpaca", "train", ("instruction", "input", "output")),
        DatasetSource("advbench", "walledai/AdvBench", "train", ("prompt",)),
    ]
}


def get_source(name: str) -> DatasetSource:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """--data-dir wins, then HFT_BENCH_DATA_DIR; None means the hub."""
    value = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def load_rows(source: DatasetSource | str, data_dir: str | Path | None = None) -> list[dict]:
    """All rows of a dataset split, from the mirror if one is configured, else from the hub."""
    source = get_source(source) if isinstance(source, str) else source
    return list(_load_rows_cached(source, resolve_data_dir(data_dir)))


@functools.lru_cache(maxsize=32)
def _load_rows_cached(source: DatasetSource, data_dir: Path | None) -> tuple[dict, ...]:
    rows = _from_mirror(source, data_dir) if data_dir else _from_hub(source)
    for i, row in enumerate(rows, start=1):  # every row, not the first only: a later one may lack a column
        missing = [c for c in source.columns if c not in row]
        if missing:
            raise DataMissingError(f"dataset {source.name!r}: row {i} has no column(s) {missing}; expected {list(source.columns)}")
    return tuple(rows)


def _from_mirror(source: DatasetSource, data_dir: Path) -> list[dict]:
    path = source.mirror_path(data_dir)
    if not path.is_file():
        raise DataMissingError(
            f"dataset {source.name!r} ({source.hub_id}, split {source.split}) not found at {path}; "
            f"point --data-dir / {DATA_DIR_ENV} at a mirror laid out as <hub_id>[/<config>]/<split>.jsonl, "
            "or unset both to load from the hub"
        )
    try:
        return read_jsonl(path, source.columns)
    except UsageError as exc:  # a truncated line, bytes that are not UTF-8, a row without a column
        raise DataMissingError(f"dataset {source.name!r} ({source.hub_id}, split {source.split}): {exc}; fix or re-download the mirror file") from None


def _from_hub(source: DatasetSource) -> list[dict]:
    import datasets  # heavy import, only when the hub is used

    try:
        if source.url:
            ds = datasets.load_dataset("json", data_files=source.url, split="train")
        else:
            ds = datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except Exception as exc:
        raise DataMissingError(
            f"dataset {source.name!r} ({source.hub_id}, split {source.split}) could not be loaded from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"without hub access, pass --data-dir (or set {DATA_DIR_ENV}) to an offline mirror"
        ) from None
    return [dict(row) for row in ds]
