"""Hold a protocol's HS to careful annotation: sample answers of finished runs, annotate them blind, compare.

    python benchmarks/protocol_annotation.py sample RUN_ID... [--work W] [--runs-dir runs] [--per-run 100] [--chunks 8]
    #   -> W/chunks/chunk-NN.jsonl (id, prompt, response only; shuffled across runs); W: runs/protocol-annotation
    #   annotators write W/labels/chunk-NN.jsonl under docs/labelling.md
    python benchmarks/protocol_annotation.py collect --work W... [--labels leaderboards/annotations/labels/cpu-v2.jsonl]
    #   -> appends each labelled row (id, run_id, index, prompt, response, kind, harmful, annotator) to the labels file
    python benchmarks/protocol_annotation.py score [--work W ... | --labels FILE ...] [--runs-dir runs] [--out-dir leaderboards/annotations]

The committed labels file is the record: `score --labels` re-scores every annotated run from it alone (work
folders live under runs/ and are lost with the machine).

For each run: the annotated HS of its sampled answers, each judge's HS on the same answers and its κ with the
annotation, and the judge's HS on all of the run's HS prompts; per protocol, each judge's agreement pooled over
all its annotated answers. With --out-dir, one `<protocol id>.json` per protocol, which `hft-bench leaderboard`
shows under that protocol's table. A protocol's goals (docs/leaderboard.md) are stated on the judge and
confirmed by this, so a protocol can't be tuned to one judge's blind spots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from hft_bench_plugins.judges.labelled.annotate import KINDS, read_jsonl, write_jsonl  # noqa: E402

from harmbench_ft.evaluation.agreement import agreement  # noqa: E402
from harmbench_ft.leaderboard import protocol_id  # noqa: E402

WORK = Path("runs/protocol-annotation")  # default work folder
LABELS = Path("leaderboards/annotations/labels/cpu-v2.jsonl")  # the committed record of every v2 label


def harmful_answers(runs_dir: Path, run_id: str) -> list[dict]:
    path = runs_dir / run_id / "generations.jsonl"
    if not path.is_file():
        raise SystemExit(f"protocol_annotation: {path} not found (a finished run stores its answers there)")
    return [r for r in read_jsonl(path) if r["kind"] == "harmful"]


def row_id(run_id: str, index: int) -> str:
    return hashlib.sha256(f"{run_id}:{index}".encode()).hexdigest()[:12]


def sample(work: Path, runs_dir: Path, run_ids: list[str], per_run: int, chunks: int, exclude: list[Path]) -> None:
    """per_run answers of each run (fewer if fewer are left), none of them already in an `exclude` sample."""
    done = {(p["run_id"], p["index"]) for w in exclude for p in read_jsonl(w / "sample.jsonl")}
    picked, blind = [], []
    for run_id in run_ids:
        answers = [r for r in harmful_answers(runs_dir, run_id) if (run_id, r["index"]) not in done]
        for r in random.Random(run_id).sample(answers, min(per_run, len(answers))):
            rid = row_id(run_id, r["index"])
            picked.append({"id": rid, "run_id": run_id, "index": r["index"]})
            blind.append({"id": rid, "prompt": r["question"], "response": r["response"]})
    random.Random(0).shuffle(blind)
    write_jsonl(work / "sample.jsonl", picked)
    size = -(-len(blind) // chunks)
    for i in range(chunks):
        write_jsonl(work / "chunks" / f"chunk-{i:02d}.jsonl", blind[i * size : (i + 1) * size])
    print(f"{len(blind)} answers of {len(run_ids)} runs in {chunks} chunks under {work / 'chunks'}")


def checked_labels(path: Path) -> list[dict]:
    """A labels file's rows, each checked against docs/labelling.md's kinds."""
    rows = read_jsonl(path)
    for row in rows:
        if row.get("kind") not in KINDS or KINDS[row["kind"]] != row.get("harmful"):
            raise SystemExit(f"protocol_annotation: {path}: row {row.get('id')} does not follow docs/labelling.md")
    return rows


def work_labels(works: list[Path]) -> tuple[dict[str, dict], list[dict]]:
    """Labels by id and the sampled (id, run_id, index) rows of annotation work folders."""
    labels = {}
    for path in sorted(p for work in works for p in (work / "labels").glob("chunk-*.jsonl")):
        for row in checked_labels(path):  # who labelled it: the label's own word, else its work folder and chunk
            labels[row["id"]] = {"annotator": f"llm-annotator, {path.parents[1].name}/{path.stem}", **row}
    picked = [p for work in works for p in read_jsonl(work / "sample.jsonl")]
    return labels, picked


def collect(works: list[Path], runs_dir: Path, labels_file: Path) -> None:
    """Append the work folders' labelled rows, with their run, index, prompt and answer, to the labels file."""
    labels, picked = work_labels(works)
    have = {r["id"] for r in read_jsonl(labels_file)} if labels_file.is_file() else set()
    answers: dict[str, dict[int, dict]] = {}  # run id -> its HS answers by index, each run's file read once
    new = []
    for p in picked:
        if p["id"] in labels and p["id"] not in have:
            if p["run_id"] not in answers:
                answers[p["run_id"]] = {r["index"]: r for r in harmful_answers(runs_dir, p["run_id"])}
            answer = answers[p["run_id"]][p["index"]]
            label = labels[p["id"]]
            new.append({"id": p["id"], "run_id": p["run_id"], "index": p["index"], "prompt": answer["question"], "response": answer["response"], **{k: label[k] for k in ("kind", "harmful", "annotator", "note") if k in label}})
    with labels_file.open("a", encoding="utf-8") as f:
        for row in new:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(new)} labelled answers added to {labels_file} ({len(picked) - sum(p['id'] in labels for p in picked)} sampled still unlabelled)")


def score(works: list[Path], runs_dir: Path, labels_files: Sequence[Path] = ()) -> dict:
    labels, picked = work_labels(works)
    for path in labels_files:
        for row in checked_labels(path):
            labels[row["id"]] = row
            picked.append({"id": row["id"], "run_id": row["run_id"], "index": row["index"]})
    picked = list({p["id"]: p for p in picked}.values())  # an answer in a work folder and in the labels file counts once
    missing = [p["id"] for p in picked if p["id"] not in labels]
    if missing:
        raise SystemExit(f"protocol_annotation: {len(missing)} sampled answers have no label yet (e.g. {missing[0]})")
    report: dict[str, dict] = {}
    pooled: dict[str, list] = {}
    for run_id in dict.fromkeys(p["run_id"] for p in picked):
        answers = {r["index"]: r for r in harmful_answers(runs_dir, run_id)}
        rows = [(answers[p["index"]], labels[p["id"]]) for p in picked if p["run_id"] == run_id]
        truth = [bool(lab["harmful"]) for _, lab in rows]
        judges = sorted(next(iter(answers.values()))["judges"])
        proto = protocol_id(json.loads((runs_dir / run_id / "result.json").read_text())["spec"])
        pooled.setdefault(proto, []).extend(rows)
        report.setdefault(proto, {"protocol": proto, "runs": {}})["runs"][run_id] = {
            "n_annotated": len(rows),
            "annotated_hs": round(100.0 * sum(truth) / len(truth), 1),
            "kinds": {k: sum(lab["kind"] == k for _, lab in rows) for k in KINDS},
            "judges": {
                j: {
                    "hs_all_prompts": round(100.0 * sum(a["judges"][j]["flagged"] for a in answers.values()) / len(answers), 1),
                    "on_sample": agreement([bool(a["judges"][j]["flagged"]) for a, _ in rows], truth),
                }
                for j in judges
            },
        }
    for proto, rows in pooled.items():
        truth = [bool(lab["harmful"]) for _, lab in rows]
        judges = sorted(set.intersection(*(set(a["judges"]) for a, _ in rows)))
        report[proto]["pooled"] = {j: agreement([bool(a["judges"][j]["flagged"]) for a, _ in rows], truth) for j in judges}
        report[proto]["set"] = f"{len(rows)} answers of this protocol's {len(report[proto]['runs'])} runs, annotated blind under docs/labelling.md"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("run_ids", nargs="+")
    s.add_argument("--work", type=Path, default=WORK)
    s.add_argument("--exclude", type=Path, action="append", default=[], help="another sample's work folder whose answers are not sampled again")
    s.add_argument("--runs-dir", type=Path, default=Path("runs"))
    s.add_argument("--per-run", type=int, default=100)
    s.add_argument("--chunks", type=int, default=8)
    k = sub.add_parser("collect")
    k.add_argument("--work", type=Path, action="append", required=True, help="a labelled sample's work folder; repeat for several")
    k.add_argument("--runs-dir", type=Path, default=Path("runs"))
    k.add_argument("--labels", type=Path, default=LABELS)
    c = sub.add_parser("score")
    c.add_argument("--work", type=Path, action="append", help="a sample's work folder; repeat to score several (default: runs/protocol-annotation unless --labels)")
    c.add_argument("--labels", type=Path, action="append", default=[], help="a labels file (collect's output); repeat for several")
    c.add_argument("--runs-dir", type=Path, default=Path("runs"))
    c.add_argument("--out-dir", type=Path, help="write <protocol id>.json here (the leaderboard reads leaderboards/annotations/)")
    args = parser.parse_args()
    if args.command == "sample":
        sample(args.work, args.runs_dir, args.run_ids, args.per_run, args.chunks, args.exclude)
    elif args.command == "collect":
        collect(args.work, args.runs_dir, args.labels)
    else:
        report = score(args.work or ([] if args.labels else [WORK]), args.runs_dir, args.labels)
        for proto, entry in report.items():
            if args.out_dir:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                (args.out_dir / f"{proto}.json").write_text(json.dumps(entry, indent=1, ensure_ascii=False) + "\n")
            for run_id, r in entry["runs"].items():
                line = ", ".join(f"{j} HS {v['hs_all_prompts']} (sample {v['on_sample']['judge_hs']}, κ {v['on_sample']['kappa']})" for j, v in r["judges"].items())
                print(f"{run_id}: annotated HS {r['annotated_hs']} on {r['n_annotated']}; {line}")
            print(f"protocol {proto}, pooled: " + ", ".join(f"{j} κ {a['kappa']} (HS {a['judge_hs']} vs {a['labelled_hs']})" for j, a in entry["pooled"].items()))


if __name__ == "__main__":
    main()
