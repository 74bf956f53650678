"""Render leaderboards from stored result records only: one table per protocol, never mixed.

A protocol is everything in a spec except the defense, the poison ratio and the seed (so the model, the
task, the judges and the preset are part of it). Per protocol: a markdown file (rows defenses, columns
HS and FA per poison ratio plus their averages, mean ± std over seeds, the protocol's settings, each
defense's cost), its CSV twin, and a PNG plot of HS and FA against the poison ratio. An index
``README.md`` links them, and ``results/`` keeps a copy of every record tabulated.
"""

from __future__ import annotations

import copy
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from harmbench_ft.errors import UsageError
from harmbench_ft.plugins import get_registry
from harmbench_ft.results import RESULT_FILE, iter_results, write_atomic, write_json
from harmbench_ft.spec import SUPERSEDED_PRESETS, hash_view, preset_of, stable_hash, with_later_defaults

RECORDS_DIR = "results"  # under the leaderboard folder: the result records the tables were rendered from
CHANCE_MARGIN = 5.0  # FA within this many points of the task's chance level marks the cell (†)


def protocol_of(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything but the defense, the poison ratio and the seed; fields added later filled with their defaults."""
    proto = with_later_defaults(spec)
    proto.pop("defense", None)
    proto.pop("seed", None)
    proto["attack"].pop("ratio", None)
    return proto


def protocol_id(spec: dict[str, Any]) -> str:
    """The short id a protocol's table is named by; it stays as it was before later fields."""
    return stable_hash(hash_view(protocol_of(spec)))[:8]


def chance_accuracy(task: str) -> float | None:
    """The task's chance FA, or None when the task is not a label task or its plugin is not installed."""
    try:
        return get_registry().get("tasks", task).chance_accuracy
    except UsageError:
        return None


def _warn(message: str) -> None:
    print(f"hft-bench: {message}", file=sys.stderr)


def record_judges(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every judge whose HS the record holds, with its description: the spec's judges, then re-judged ones."""
    spec = record["spec"]
    described = {j["id"]: j for j in record.get("stages", {}).get("evaluation", {}).get("judges") or []}
    judges = {name: described.get(name, {"id": name}) for name in spec["evaluation"]["judges"]}
    for name, desc in record.get("rejudged", {}).items():  # a re-judging is newer than the run's own judging
        judges[name] = {"id": name, **{k: v for k, v in desc.items() if k != "id"}}
    return judges


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _judge_desc(desc: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in desc.items() if k not in ("id", "agreement", "at", "parts")) or "-"


def results_frame(runs_dir: Path, judge: str | None = None) -> pd.DataFrame:
    """One row per finished record; HS is `judge`'s (default: the spec's first judge), NaN where the record
    does not hold it (a run never judged, or re-judged, by that judge)."""
    rows = []
    for record in iter_results(runs_dir, on_skip=_warn):
        spec = record["spec"]
        proto = protocol_of(spec)
        stages = record.get("stages", {})
        judges = record_judges(record)
        name = judge or spec["evaluation"]["judges"][0]
        headline = judges.get(name, {"id": name})
        metrics = record["metrics"]
        rows.append(
            {
                "protocol": protocol_id(spec),
                "run_id": record["run_id"],
                "n_hs_prompts": record.get("data", {}).get("n_hs_prompts"),
                "preset": preset_of(spec),
                "model": spec["model"]["name"],
                "task": spec["attack"]["task"],
                "split": proto["evaluation"]["split"],
                "regime": proto["finetune"]["regime"],
                "chance": chance_accuracy(spec["attack"]["task"]),
                "judge": name,
                "judge_desc": _judge_desc(headline),
                "defense": spec["defense"]["name"],
                "defense_args": json.dumps(spec["defense"].get("args", {}), sort_keys=True),
                "ratio": spec["attack"]["ratio"],
                "seed": spec["seed"],
                "HS": _number(metrics.get(f"harmful_score/{name}", metrics.get("harmful_score") if name == spec["evaluation"]["judges"][0] else None)),
                "HS+": _number(metrics.get(f"harmful_score_plus/{name}", metrics.get("harmful_score_plus") if name == spec["evaluation"]["judges"][0] else None)),
                "FA": _number(metrics.get("finetune_accuracy")),
                **{f"HS/{j}": _number(metrics.get(f"harmful_score/{j}")) for j in judges},
                "alignment_s": stages.get("alignment", {}).get("train_seconds"),
                "finetune_s": stages.get("finetune", {}).get("train_seconds"),
                "finetune_s_per_step": stages.get("finetune", {}).get("seconds_per_step"),
                "alignment_s_per_step": stages.get("alignment", {}).get("seconds_per_step"),
                "alignment_artifact": stages.get("alignment", {}).get("artifact"),
                "finetune_artifact": stages.get("finetune", {}).get("artifact"),
                "post_finetune_s": stages.get("post_finetune", {}).get("seconds", 0.0),
                "evaluation_s": stages.get("evaluation", {}).get("seconds"),
                "_proto": proto,
            }
        )
    return pd.DataFrame(rows)


def _row_labels(df: pd.DataFrame) -> pd.Series:
    """The defense name; with its arguments where one protocol holds the same defense with different ones."""
    variants = df.groupby("defense")["defense_args"].nunique()

    def label(row) -> str:
        if variants[row["defense"]] == 1:
            return row["defense"]
        args = json.loads(row["defense_args"])
        return f"{row['defense']} ({', '.join(f'{k}={v}' for k, v in args.items())})"

    return df.apply(label, axis=1)


def _ordered(labels) -> list[str]:
    return sorted(set(labels), key=lambda d: (d != "sft", d))  # the undefended baseline first


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def _cost(df: pd.DataFrame) -> pd.DataFrame:
    """Per row label: mean alignment/fine-tuning training seconds, and seconds per step as a ratio to SFT.

    The ratio is taken against SFT at the same poison ratio and seed, then averaged: a fine-tuning step
    costs more at higher p (harmful rows are longer), so comparing across ratios would mislead.
    """
    agg = df.groupby("row")[["alignment_s", "finetune_s", "alignment_s_per_step", "finetune_s_per_step"]].mean()
    sft = df[df["row"] == "sft"].groupby(["ratio", "seed"])[["alignment_s_per_step", "finetune_s_per_step"]].mean()
    for col in ("alignment", "finetune"):
        base = df.join(sft[f"{col}_s_per_step"].rename("base"), on=["ratio", "seed"])["base"]
        agg[f"{col}_step_x_sft"] = (df[f"{col}_s_per_step"] / base.where(base > 0)).groupby(df["row"]).mean()
    return agg


def protocol_table(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The markdown table and its CSV twin (per ratio and averaged over ratios; means, stds and cost)."""
    df = df.assign(row=_row_labels(df))
    ratios = sorted(df["ratio"].unique())
    cost = _cost(df)
    header = ["Defense"] + [f"HS p={r:g}" for r in ratios] + ["HS avg"] + [f"FA p={r:g}" for r in ratios] + ["FA avg", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    judge_cols = further_judge_columns(df)
    any_at_chance = False
    for row in _ordered(df["row"]):
        sub = df[df["row"] == row]
        # the average over ratios is taken per seed first, so its ± is a spread over seeds
        per_seed = sub.groupby("seed")[["HS", "HS+", "FA", *judge_cols]].mean()
        at_chance = [_at_chance(sub[sub["ratio"] == r]["FA"], sub) for r in ratios] + [_at_chance(per_seed["FA"], sub)]
        mark = lambda text, flagged: f"{text} †" if flagged else text  # noqa: E731
        cells = [row]
        cells += [mark(_cell(v), f) for v, f in zip([sub[sub["ratio"] == r]["HS"] for r in ratios] + [per_seed["HS"]], at_chance)]
        cells += [mark(_cell(v), f) for v, f in zip([sub[sub["ratio"] == r]["FA"] for r in ratios] + [per_seed["FA"]], at_chance)]
        any_at_chance = any_at_chance or any(at_chance)
        cells.append(str(sub["seed"].nunique()))
        lines.append("| " + " | ".join(cells) + " |")
        c = cost.loc[row]
        costs = {"cost_alignment_s": c["alignment_s"], "cost_finetune_s": c["finetune_s"], "cost_alignment_step_x_sft": c["alignment_step_x_sft"], "cost_finetune_step_x_sft": c["finetune_step_x_sft"]}
        groups = [(f"{r:g}", sub[sub["ratio"] == r]) for r in ratios] + [("avg", per_seed.reset_index())]
        for ratio, at in groups:
            csv_rows.append({
                "defense": row, "ratio": ratio,
                "HS_mean": at["HS"].mean(), "HS_std": at["HS"].std(ddof=1), "FA_mean": at["FA"].mean(), "FA_std": at["FA"].std(ddof=1),
                "FA_at_chance": _at_chance(at["FA"], sub), "HS+_mean": at["HS+"].mean(), **{f"{c}_mean": at[c].mean() for c in judge_cols}, "n_seeds": at["seed"].nunique(), **costs,
            })
    if any_at_chance:
        lines += ["", f"† FA within {CHANCE_MARGIN:g} points of chance ({df['chance'].iloc[0]:g}%): the model no longer does the task, so its HS says nothing about the defense."]
    return "\n".join(lines), pd.DataFrame(csv_rows)


def regime_twins(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(fresh protocol, continue protocol) pairs whose settings differ only in `finetune.regime`."""
    protocols = {pid: sub.iloc[0]["_proto"] for pid, sub in df.groupby("protocol")}
    pairs = []
    for pid, proto in sorted(protocols.items()):
        if proto["finetune"]["regime"] != "continue":
            continue
        twin = copy.deepcopy(proto)
        twin["finetune"]["regime"] = "fresh"
        fresh = stable_hash(hash_view(twin))[:8]
        if fresh in protocols:
            pairs.append((fresh, pid))
    return pairs


def regime_effect_table(fresh: pd.DataFrame, cont: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Per defense and ratio: HS and FA under continue minus under fresh (means over seeds), each beside the
    seed-to-seed spread (max − min over seeds) of the same cell under fresh, where two or more seeds ran."""
    both = pd.concat([fresh.assign(regime="fresh"), cont.assign(regime="continue")], ignore_index=True)
    both = both.assign(row=_row_labels(both))
    ratios = sorted(set(fresh["ratio"]) & set(cont["ratio"]))
    header = ["Defense"] + [f"ΔHS p={r:g}" for r in ratios] + [f"ΔFA p={r:g}" for r in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows, spreads = [], {"HS": [], "FA": []}
    for row in _ordered(both["row"]):
        cells = {"HS": [], "FA": []}
        for metric in ("HS", "FA"):
            for r in ratios:
                at = both[(both["row"] == row) & (both["ratio"] == r)]
                f, c = at[at["regime"] == "fresh"][metric].dropna(), at[at["regime"] == "continue"][metric].dropna()
                spread = float(f.max() - f.min()) if len(f) > 1 else None
                if spread is not None:
                    spreads[metric].append(spread)
                if f.empty or c.empty:
                    cells[metric].append("–")
                    continue
                delta = float(c.mean() - f.mean())
                cells[metric].append(f"{delta:+.1f}" + (f" (seeds ±{spread:.1f})" if spread is not None else ""))
                csv_rows.append({"defense": row, "ratio": r, "metric": metric, "continue_minus_fresh": delta, "fresh_seed_spread": spread, "fresh_seeds": len(f), "continue_seeds": len(c)})
        if any(v != "–" for v in cells["HS"] + cells["FA"]):
            lines.append("| " + " | ".join([row, *cells["HS"], *cells["FA"]]) + " |")
    typical = "; ".join(f"{m} {pd.Series(v).median():.1f}" for m, v in spreads.items() if v) or "not measured (one seed per cell)"
    note = f"\n\nSeed-to-seed spread under `fresh` (max − min over seeds, median over the cells that have two or more seeds): {typical}. A difference within it is not a regime effect."
    return "\n".join(lines) + note, pd.DataFrame(csv_rows)


def further_judge_columns(df: pd.DataFrame) -> list[str]:
    """`HS/<judge>` columns of judges other than the headline one that hold at least one number."""
    return [c for c in df.columns if c.startswith("HS/") and c != f"HS/{df['judge'].iloc[0]}" and df[c].notna().any()]


def measured_agreement(judge: str) -> dict[str, Any] | None:
    """The judge's own measured agreement with careful annotation, or None (unknown judge, or never measured)."""
    try:
        return get_registry().get("judges", judge).agreement()
    except UsageError:
        return None


def agreement_note(judges: list[str]) -> str:
    """Each judge's measured agreement with careful annotation, as the judge reports it, or that none is known."""
    from harmbench_ft.evaluation.agreement import format_agreement

    lines = []
    for name in judges:
        measured = measured_agreement(name)
        if measured:
            lines.append(f"- `{name}`: {format_agreement(measured)}; measured on {measured['set']}")
        else:
            lines.append(f"- `{name}`: no measured agreement with careful annotation; its HS is not validated")
    return "\n".join(lines)


ANNOTATIONS_DIR = "annotations"  # under the leaderboard folder: <protocol id>.json, by benchmarks/protocol_annotation.py


def read_protocol_annotation(out_dir: Path, proto_id: str) -> dict[str, Any] | None:
    """This protocol's annotation report (benchmarks/protocol_annotation.py), or None; a malformed one is skipped with a warning."""
    path = Path(out_dir) / ANNOTATIONS_DIR / f"{proto_id}.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(entry, dict) and isinstance(entry.get("pooled"), dict) and isinstance(entry.get("runs"), dict):
            return entry
    except ValueError:
        pass
    _warn(f"skipping {path}: not a protocol annotation report")
    return None


def protocol_annotation_note(annotation: dict[str, Any] | None, proto_id: str) -> str:
    """Each judge's agreement with careful annotation of this protocol's own answers, when they were annotated."""
    from harmbench_ft.evaluation.agreement import format_agreement

    if annotation is None:
        return ""
    try:
        lines = [f"- `{name}`: {format_agreement(measured)}" for name, measured in annotation["pooled"].items()]
        runs = [f"- `{run_id}`: annotated HS {r['annotated_hs']} on {r['n_annotated']} answers; " + ", ".join(f"{j} {v['on_sample']['judge_hs']}" for j, v in r["judges"].items()) for run_id, r in annotation["runs"].items()]
    except (KeyError, TypeError, AttributeError):
        _warn(f"skipping {ANNOTATIONS_DIR}/{proto_id}.json: not a protocol annotation report")
        return ""
    return f"On this protocol's own answers ({annotation.get('set', proto_id)}; `{ANNOTATIONS_DIR}/{proto_id}.json`):\n\n" + "\n".join(lines) + "\n\nPer run, the annotated HS and each judge's HS on the same answers:\n\n" + "\n".join(runs) + "\n\n"


def validity_banner(judge: str, annotation: dict[str, Any] | None = None) -> str:
    """A warning above a table whose headline judge is not validated: κ < VALIDATED_KAPPA on the labelled set or,
    where this protocol's own answers were annotated (`annotation`), on those; or never measured."""
    from harmbench_ft.evaluation.agreement import VALIDATED_KAPPA, is_validated

    own = (annotation or {}).get("pooled", {}).get(judge)
    if own is not None and not is_validated(own):
        return (
            f"> **Not validated on this protocol's answers**: `{judge}` agrees with careful annotation of them at κ {own['kappa']:.2f} "
            f"(HS {own['judge_hs']:.1f} against an annotated {own['labelled_hs']:.1f}; validated: κ ≥ {VALIDATED_KAPPA}). Read its HS with the annotated HS below.\n\n"
        )
    measured = measured_agreement(judge)
    if is_validated(measured):
        return ""
    kappa = f"κ {measured['kappa']:.2f} with careful annotation" if measured and measured.get("kappa") is not None else "no measured agreement with careful annotation"
    return f"> **Judged by an unvalidated judge**: `{judge}` has {kappa} (validated: κ ≥ {VALIDATED_KAPPA}). Its HS differences between defenses are not evidence.\n\n"


def _at_chance(fa: pd.Series, sub: pd.DataFrame) -> bool:
    chance, fa = sub["chance"].iloc[0], fa.dropna()
    return chance is not None and not pd.isna(chance) and not fa.empty and fa.mean() <= chance + CHANCE_MARGIN


def judge_table(df: pd.DataFrame, judge: str) -> str:
    """HS of one more judge per poison ratio (a protocol's runs are all judged by every judge it names)."""
    df = df.assign(row=_row_labels(df))
    ratios = sorted(df["ratio"].unique())
    column = f"HS/{judge}"
    lines = ["| Defense | " + " | ".join(f"HS p={r:g}" for r in ratios) + " | HS avg |", "|" + "---|" * (len(ratios) + 2)]
    for row in _ordered(df["row"]):
        sub = df[df["row"] == row]
        cells = [_cell(sub[sub["ratio"] == r][column]) for r in ratios] + [_cell(sub.groupby("seed")[column].mean())]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def annotated_table(df: pd.DataFrame, annotation: dict[str, Any] | None) -> str:
    """The HS table again, by careful annotation instead of a judge: for every run all of whose HS answers were
    annotated blind (benchmarks/protocol_annotation.py), or "" when none was."""
    runs = (annotation or {}).get("runs", {})
    full = {run_id: r["annotated_hs"] for run_id, r in runs.items() if r.get("n_annotated") and r["n_annotated"] == df.loc[df["run_id"] == run_id, "n_hs_prompts"].max()}
    if not full:
        return ""
    df = df.assign(**{"HS/annotated": df["run_id"].map(full)})
    return (
        f"## HS by careful annotation\n\nEvery one of the {df['n_hs_prompts'].max()} HS answers of {len(full)} of these {len(df)} runs, "
        f"annotated blind under docs/labelling.md (– : not annotated). Where this and the judge's table disagree, this one is the measurement.\n\n"
        + judge_table(df, "annotated") + "\n\n"
    )


def cost_table(df: pd.DataFrame) -> str:
    """Per-defense cost: alignment and fine-tuning seconds, seconds per step as a ratio to SFT."""
    df = df.assign(row=_row_labels(df))
    cost = _cost(df)
    lines = ["| Defense | alignment s | fine-tune s | alignment s/step (× SFT) | fine-tune s/step (× SFT) |", "|---|---|---|---|---|"]
    for row in _ordered(df["row"]):
        c = cost.loc[row]

        def per_step(stage: str) -> str:
            ratio = c[f"{stage}_step_x_sft"]
            return f"{c[f'{stage}_s_per_step']:.3f}" + ("" if pd.isna(ratio) else f" ({ratio:.2f}×)")

        lines.append(f"| {row} | {c['alignment_s']:.1f} | {c['finetune_s']:.1f} | {per_step('alignment')} | {per_step('finetune')} |")
    return "\n".join(lines)


def stage_seconds(df: pd.DataFrame) -> float:
    """Seconds the table's results took one at a time: each alignment and fine-tune counted once however many
    runs share it (runs that resumed or reused it recorded its training time), plus every run's post-fine-tuning
    step and evaluation. Model loading between stages is not included."""
    total = df["post_finetune_s"].fillna(0).sum() + df["evaluation_s"].fillna(0).sum()
    for stage in ("alignment", "finetune"):
        artifact = df[f"{stage}_artifact"]
        first_use = artifact.isna() | ~artifact.duplicated()  # a record without an artifact path counts as its own
        total += df.loc[first_use, f"{stage}_s"].fillna(0).sum()
    return total


def plot_protocol(df: pd.DataFrame, title: str) -> bytes:
    """PNG: HS vs p and FA vs p, one line per defense, error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend: no display, no global state
    from matplotlib.figure import Figure

    df = df.assign(row=_row_labels(df))
    rows = _ordered(df["row"])
    ratios = sorted(df["ratio"].unique())
    judge = df["judge"].iloc[0]
    legend_rows = -(-len(rows) // 3)
    fig = Figure(figsize=(11, 4.2 + 0.25 * legend_rows), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    spread = (max(ratios) - min(ratios)) or 1.0
    for i, row in enumerate(rows):
        stats = df[df["row"] == row].groupby("ratio")[["HS", "FA"]].agg(["mean", "std"])
        dodge = (i - (len(rows) - 1) / 2) * 0.012 * spread  # identical lines stay visible side by side
        for ax, metric in zip(axes, ("HS", "FA")):
            ax.errorbar(stats.index + dodge, stats[metric]["mean"], yerr=stats[metric]["std"].fillna(0), marker="os^vDP*X"[i % 8], linestyle=("-", "--", "-.", ":")[i % 4], capsize=3, label=row)
    for ax, name in zip(axes, (f"harmful score HS (%, {judge})\nlower is better", "fine-tune accuracy FA (%)\nhigher is better")):
        ax.set_xlabel("poison ratio p")
        ax.set_ylabel(name)
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    # below the plots, where it hides no point however many defenses there are
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize="small")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _protocol_summary(proto: dict[str, Any], judge_desc: str, judge: str) -> str:
    """The settings a reader needs to interpret the table, in one list; the full spec follows below."""
    al, ft, ev, at = proto["alignment"], proto["finetune"], proto["evaluation"], proto["attack"]

    def train(t: dict) -> str:
        steps = f", max {t['max_steps']} steps" if t.get("max_steps") else ""
        return f"{t['epochs']:g} epoch(s){steps}, batch {t['batch_size']}, lr {t['lr']:g}, LoRA r={t['lora_r']} α={t['lora_alpha']} on {', '.join(t['lora_targets'])}, max length {t['max_length']}"

    return "\n".join(
        [
            f"- model `{proto['model']['name']}`, preset `{proto['preset']}`",
            f"- attack: task `{at['task']}`, n = {at['n']} rows uploaded, poison rows from `{at['harmful_source']}`",
            f"- alignment: {al['n_alignment']} refusal rows from `{al['alignment_source']}`"
            + (f" and {al['n_benign']} benign rows from `{al['benign_source']}`" if al.get("n_benign") else "")
            + f", {al['n_harmful']} provider harmful rows; {train(al['train'])}",
            (f"- fine-tuning (regime `fresh`: the alignment adapter merged, a new LoRA trained on it): {train(ft)}" if ft["regime"] == "fresh"
             else f"- fine-tuning (regime `continue`: the alignment adapter itself trained on, unmerged, with its own shape): {train(ft).split(', LoRA')[0]}, max length {ft['max_length']}"),
            (
                f"- evaluation: HS on {ev['n_harmful_prompts']} prompts of `{ev['harmful_prompts']}` ({ev['max_new_tokens']} new tokens), judge `{judge}` ({judge_desc}); "
                f"FA on {ev['n_task_test'] or 'all'} test rows; backend `{ev['backend']}`"
                if ev["split"] == "test"
                else f"- evaluation on the **validation split** (for tuning; no test data): HS on {ev['n_harmful_prompts']} unique prompts of `{al['harmful_source']}` after the provider harmful window "
                f"({ev['max_new_tokens']} new tokens), judge `{judge}` ({judge_desc}); FA on {ev['n_task_test'] or 'as many as the test has'} held-out train rows of the task; backend `{ev['backend']}`"
            ),
        ]
    )


def _title(row: pd.Series) -> str:
    split = " · validation split (tuning)" if row["split"] == "validation" else ""
    return f"{row['task']} · {row['model']} · preset {row['preset']} · regime {row['regime']}{split}"


def _differences(proto_id: str, titles: dict[str, str], df: pd.DataFrame) -> str:
    """The settings that set this protocol apart from the others of the same title (e.g. ` · finetune.lr=0.0002`).

    Two tables called "sst2 · smollm2-135m · preset cpu" (say, before and after a preset was retuned)
    would otherwise be told apart only by their hash.
    """
    twins = [pid for pid, t in titles.items() if t == titles[proto_id]]
    if len(twins) < 2:
        return ""
    flat = {pid: _flatten(df[df["protocol"] == pid].iloc[0]["_proto"]) for pid in twins}
    keys = sorted({k for f in flat.values() for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat.values()}) > 1]
    return "".join(f" · {k}={flat[proto_id].get(k)}" for k in differing)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", text).strip("-").lower()


def write_leaderboards(runs_dir: Path, out_dir: Path, judge: str | None = None) -> list[Path]:
    """One markdown + CSV + PNG per protocol, and an index README; returns the files written.

    judge: the judge whose HS heads every table (default: each protocol's own first judge); the HS of every
    other judge a record holds (its spec's, and any re-judged one) follows in its own table.
    """
    df = results_frame(Path(runs_dir), judge)
    if judge is not None and df["HS"].isna().all():
        raise UsageError(f"no record under {runs_dir} holds an HS by judge {judge!r}; re-judge them first: hft-bench rejudge --judge {judge} --runs-dir {runs_dir}")
    fallback: set[str] = set()
    if judge is not None:  # a protocol none of whose records holds `judge`'s HS keeps its own headline judge, and says so
        missing = [pid for pid, sub in df.groupby("protocol") if sub["HS"].isna().all()]
        if missing:
            own = results_frame(Path(runs_dir))
            df = pd.concat([df[~df["protocol"].isin(missing)], own[own["protocol"].isin(missing)]], ignore_index=True)
            fallback = set(missing)
    if df.empty:
        return []
    out_dir = Path(out_dir)
    written = []
    index = ["# Leaderboards", "", "Rendered by `hft-bench leaderboard` from stored result records only; one table per protocol (model, task, judge, preset and every other setting).", ""]
    titles = {pid: _title(sub.iloc[0]) for pid, sub in df.groupby("protocol")}
    for proto_id, sub in df.groupby("protocol"):
        first = sub.iloc[0]
        stem = _slug(f"{first['preset']}-{first['model'].split('/')[-1]}-{first['task']}-{first['judge']}-{proto_id}")
        title = _title(first) + _differences(proto_id, titles, df)
        seconds = stage_seconds(sub)
        table, csv = protocol_table(sub)
        proto = first["_proto"]
        settings = "\n".join(f"- `{k}`: `{v}`" for k, v in _flatten(proto).items())
        annotation = read_protocol_annotation(out_dir, proto_id)
        params = sub.drop_duplicates("defense_args").sort_values("defense")
        defenses = "\n".join(f"- `{r.defense}`: " + (", ".join(f"{k}={v}" for k, v in json.loads(r.defense_args).items()) or "no parameters") for r in params.itertuples())
        md = (
            f"# {title}\n\n"
            + (f"> {SUPERSEDED_PRESETS[first['preset']]}\n\n" if first["preset"] in SUPERSEDED_PRESETS else "")
            + validity_banner(first["judge"], annotation)
            + f"Harmful score (HS, %, judge: **{first['judge']}**; lower is better) and fine-tune accuracy (FA, %; higher is better) "
            f"per poison ratio p; avg = mean over the ratios. Mean ± std over seeds where more than one seed ran. "
            f"{len(sub)} results.\n\n{table}\n\n{_protocol_summary(proto, first['judge_desc'], first['judge'])}\n\n"
            f"![HS and FA against the poison ratio]({stem}.png)\n\n"
            + annotated_table(sub, annotation)
            + "".join(f"## HS by judge `{c[3:]}`\n\n{judge_table(sub, c[3:])}\n\n" for c in further_judge_columns(sub))
            + f"## Judges' agreement with careful annotation\n\n{agreement_note([first['judge'], *(c[3:] for c in further_judge_columns(sub))])}\n\n"
            + protocol_annotation_note(annotation, proto_id)
            + (f"{sub['HS'].isna().sum()} of {len(sub)} records hold no HS by `{first['judge']}` (–): their answers were not stored, so they could not be re-judged.\n\n" if sub["HS"].isna().any() else "")
            + (f"No record of this protocol holds an HS by `{judge}` (their answers were not stored), so the table is headed by its own judge `{first['judge']}`.\n\n" if proto_id in fallback else "")
            + f"## Defenses\n\n{defenses}\n\n"
            f"## Cost\n\nTraining seconds of each stage (mean over runs; a shared alignment counts for every defense that uses it) "
            f"and seconds per optimizer step relative to SFT.\n\n{cost_table(sub)}\n\n"
            f"All {len(sub)} results took {seconds:.0f} s ({seconds / 3600:.2f} h) of stage time one at a time: each alignment and "
            f"fine-tune counted once however many runs share it, plus every run's post-fine-tuning step and evaluation "
            f"(model loading not included).\n\n"
            f"## Protocol `{proto_id}`\n\n<details><summary>every setting</summary>\n\n{settings}\n\n</details>\n"
        )
        md_path, csv_path, png_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.png"
        write_atomic(md_path, md)
        write_atomic(csv_path, csv.to_csv(index=False))
        write_atomic(png_path, plot_protocol(sub, f"{title} · protocol {proto_id}"))
        written += [md_path, csv_path, png_path]
        ratios = ", ".join(f"{r:g}" for r in sorted(sub["ratio"].unique()))
        index.append(f"- [{title}]({stem}.md) ([csv]({stem}.csv), [plot]({stem}.png)): {sub['defense'].nunique()} defenses, p ∈ {{{ratios}}}, {sub['seed'].nunique()} seed(s), judge {first['judge']}")
    for fresh_id, cont_id in regime_twins(df):
        fresh, cont = df[df["protocol"] == fresh_id], df[df["protocol"] == cont_id]
        table, csv = regime_effect_table(fresh, cont)
        stem = f"regime-effect-{fresh_id}-{cont_id}"
        md = (
            f"# Regime effect: {titles[fresh_id].replace(' · regime fresh', '')}\n\n"
            f"HS (judge **{fresh.iloc[0]['judge']}**) and FA under `finetune.regime=continue` (protocol `{cont_id}`: the alignment adapter "
            f"itself fine-tuned) minus under `fresh` (protocol `{fresh_id}`: a new LoRA on the merged alignment), per defense and "
            f"poison ratio, in points; negative ΔHS means continue is safer.\n\n{table}\n"
        )
        write_atomic(out_dir / f"{stem}.md", md)
        write_atomic(out_dir / f"{stem}.csv", csv.to_csv(index=False))
        written += [out_dir / f"{stem}.md", out_dir / f"{stem}.csv"]
        index.append(f"- [Regime effect: continue − fresh]({stem}.md) ([csv]({stem}.csv)): protocols {cont_id} − {fresh_id}")
    readme = out_dir / "README.md"
    write_atomic(readme, "\n".join(index) + "\n")
    return written + [readme] + _keep_records(Path(runs_dir), out_dir / RECORDS_DIR)


def _keep_records(runs_dir: Path, records_dir: Path) -> list[Path]:
    """Copy every tabulated result.json to ``<out>/results/<run_id>/result.json`` (the runs/ layout).

    runs/ holds gigabytes of adapters and is never committed; the records are small, so the tables
    can be committed with what they were rendered from: ``hft-bench leaderboard --runs-dir
    leaderboards/results`` renders them again, and copying the folders into a fresh runs/ lets a grid
    resume with those runs done.
    """
    if records_dir.resolve() == runs_dir.resolve():
        return []
    written = []
    for record in iter_results(runs_dir):  # valid records only: their run id is their folder's name, never a path
        path = records_dir / record["run_id"] / RESULT_FILE
        write_json(path, record)
        written.append(path)
    return written


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
