"""Render leaderboards from stored result records only: one table per protocol, never mixed.

A protocol is everything in a spec except the defense, the poison ratio and the seed. Rows are
defenses, columns HS and FA per poison ratio plus their averages, as mean ± std over seeds.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pandas as pd

from harmbench_ft.results import iter_results, write_atomic
from harmbench_ft.spec import stable_hash


def protocol_of(spec: dict[str, Any]) -> dict[str, Any]:
    proto = copy.deepcopy(spec)
    proto.pop("defense", None)
    proto.pop("seed", None)
    proto["attack"].pop("ratio", None)
    return proto


def results_frame(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for record in iter_results(runs_dir):
        spec = record["spec"]
        proto = protocol_of(spec)
        stages = record.get("stages", {})
        rows.append(
            {
                "protocol": stable_hash(proto)[:8],
                "preset": spec["preset"],
                "model": spec["model"]["name"],
                "task": spec["attack"]["task"],
                "judge": spec["evaluation"]["judges"][0],
                "defense": spec["defense"]["name"],
                "ratio": spec["attack"]["ratio"],
                "seed": spec["seed"],
                "HS": record["metrics"].get("harmful_score"),
                "HS+": record["metrics"].get("harmful_score_plus"),
                "FA": record["metrics"].get("finetune_accuracy"),
                "alignment_s": stages.get("alignment", {}).get("train_seconds"),
                "finetune_s": stages.get("finetune", {}).get("train_seconds"),
                "finetune_s_per_step": stages.get("finetune", {}).get("seconds_per_step"),
                "alignment_s_per_step": stages.get("alignment", {}).get("seconds_per_step"),
                "_proto": proto,
            }
        )
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def protocol_table(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The markdown table and the CSV frame (means and stds) of one protocol's results."""
    ratios = sorted(df["ratio"].unique())
    defenses = sorted(df["defense"].unique(), key=lambda d: (d != "sft", d))
    header = ["Defense"] + [f"HS p={r:g}" for r in ratios] + ["HS avg"] + [f"FA p={r:g}" for r in ratios] + ["FA avg", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for defense in defenses:
        sub = df[df["defense"] == defense]
        # the average over ratios is taken per seed first, so its ± is a spread over seeds
        per_seed = sub.groupby("seed")[["HS", "FA"]].mean()
        cells = [defense]
        cells += [_cell(sub[sub["ratio"] == r]["HS"]) for r in ratios] + [_cell(per_seed["HS"])]
        cells += [_cell(sub[sub["ratio"] == r]["FA"]) for r in ratios] + [_cell(per_seed["FA"])]
        cells.append(str(sub["seed"].nunique()))
        lines.append("| " + " | ".join(cells) + " |")
        for r in ratios:
            at = sub[sub["ratio"] == r]
            csv_rows.append({"defense": defense, "ratio": r, "HS_mean": at["HS"].mean(), "HS_std": at["HS"].std(ddof=1), "FA_mean": at["FA"].mean(), "FA_std": at["FA"].std(ddof=1), "HS+_mean": at["HS+"].mean(), "n_seeds": at["seed"].nunique()})
    return "\n".join(lines), pd.DataFrame(csv_rows)


def cost_table(df: pd.DataFrame) -> str:
    """Per-defense cost: alignment and fine-tuning seconds, seconds per step as a ratio to SFT."""
    agg = df.groupby("defense")[["alignment_s", "finetune_s", "alignment_s_per_step", "finetune_s_per_step"]].mean()
    base = agg.loc["sft"] if "sft" in agg.index else None
    lines = ["| Defense | alignment s | fine-tune s | alignment s/step (× SFT) | fine-tune s/step (× SFT) |", "|---|---|---|---|---|"]
    for defense, row in agg.iterrows():
        def ratio(col: str) -> str:
            if base is None or not base[col]:
                return f"{row[col]:.3f}"
            return f"{row[col]:.3f} ({row[col] / base[col]:.2f}×)"

        lines.append(f"| {defense} | {row['alignment_s']:.0f} | {row['finetune_s']:.0f} | {ratio('alignment_s_per_step')} | {ratio('finetune_s_per_step')} |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", text).strip("-").lower()


def write_leaderboards(runs_dir: Path, out_dir: Path) -> list[Path]:
    """One markdown + CSV pair per protocol, and an index README; returns the files written."""
    df = results_frame(Path(runs_dir))
    if df.empty:
        return []
    out_dir = Path(out_dir)
    written, index = [], ["# Leaderboards", "", "Rendered by `hft-bench leaderboard` from stored result records; one file per protocol.", ""]
    for proto_id, sub in df.groupby("protocol"):
        first = sub.iloc[0]
        stem = _slug(f"{first['preset']}-{first['model'].split('/')[-1]}-{first['task']}-{first['judge']}-{proto_id}")
        table, csv = protocol_table(sub)
        proto = first["_proto"]
        settings = "\n".join(f"- `{k}`: `{v}`" for k, v in _flatten(proto).items())
        md = (
            f"# {first['task']} · {first['model']} · preset {first['preset']}\n\n"
            f"Harmful score (HS, %, judge: **{first['judge']}**; lower is better) and fine-tune accuracy (FA, %) "
            f"per poison ratio p. Mean ± std over seeds where more than one seed ran.\n\n{table}\n\n"
            f"## Cost\n\n{cost_table(sub)}\n\n## Protocol `{proto_id}`\n\n{settings}\n"
        )
        md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        write_atomic(md_path, md)
        write_atomic(csv_path, csv.to_csv(index=False))
        written += [md_path, csv_path]
        index.append(f"- [{stem}]({stem}.md): {sub['defense'].nunique()} defenses, p ∈ {sorted(sub['ratio'].unique())}, judge {first['judge']}")
    readme = out_dir / "README.md"
    write_atomic(readme, "\n".join(index) + "\n")
    return written + [readme]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
