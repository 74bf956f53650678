"""Hand the collected answers to annotators in blind chunks, and merge their labels into the labelled set.

    python -m hft_bench_plugins.judges.labelled.annotate chunks   # new rows of answers.jsonl -> chunks/chunk-NN.jsonl
    python -m hft_bench_plugins.judges.labelled.annotate merge    # labels/pass1-*.jsonl (+ pass2-*) -> answers.jsonl here

A chunk holds only (id, prompt, response), shuffled, so an annotator sees neither the model that answered nor
any judge's score. Each annotator writes ``labels/passP-chunk-NN.jsonl`` with one
``{"id", "kind", "harmful", "note"?}`` per row under docs/labelling.md. Pass 1 labels every row; pass 2, by
another annotator who never saw pass 1, labels a subset, for the inter-annotator κ.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from hft_bench_plugins.judges.pair_clf import LABELS_FILE, is_heldout

KINDS = {"harmful": True, "refusal": False, "harmless": False, "off-topic": False, "gibberish": False}
WORK = Path("runs/labelling")
CHUNK_ROWS = 125  # rows per annotator: about 25 minutes of careful reading


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_chunks(work: Path) -> list[Path]:
    answers = read_jsonl(work / "answers.jsonl")
    chunked = {r["id"] for p in sorted((work / "chunks").glob("chunk-*.jsonl")) for r in read_jsonl(p)}
    new = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in answers if r["id"] not in chunked]
    random.Random(len(chunked)).shuffle(new)
    start = len(list((work / "chunks").glob("chunk-*.jsonl")))
    written = []
    for i in range(0, len(new), CHUNK_ROWS):
        path = work / "chunks" / f"chunk-{start + i // CHUNK_ROWS:02d}.jsonl"
        write_jsonl(path, new[i : i + CHUNK_ROWS])
        written.append(path)
    return written


def read_labels(work: Path, pass_no: int) -> dict[str, dict]:
    """Labels of one pass by row id; each checked against the guide's kinds."""
    out: dict[str, dict] = {}
    for path in sorted((work / "labels").glob(f"pass{pass_no}-chunk-*.jsonl")):
        annotator = f"llm-annotator pass {pass_no}, {path.stem.split('-', 1)[1]}"
        for row in read_jsonl(path):
            if row.get("kind") not in KINDS or KINDS[row["kind"]] != row.get("harmful"):
                raise ValueError(f"{path}: row {row.get('id')}: kind {row.get('kind')!r} / harmful {row.get('harmful')!r} do not follow docs/labelling.md")
            out[row["id"]] = {**row, "annotator": annotator}
    return out


def merge(work: Path, out: Path) -> dict[str, int]:
    answers = {r["id"]: r for r in read_jsonl(work / "answers.jsonl")}
    first, second = read_labels(work, 1), read_labels(work, 2)
    rows = []
    for rid, answer in answers.items():
        if rid not in first:
            continue  # not labelled yet
        label = first[rid]
        row = {
            "id": rid, "prompt_set": answer["prompt_set"], "prompt": answer["prompt"], "response": answer["response"], "models": answer["models"],
            "kind": label["kind"], "harmful": label["harmful"], "annotator": label["annotator"],
            "split": "heldout" if is_heldout(answer["prompt"]) else "train",
        }
        if label.get("note"):
            row["note"] = label["note"]
        if rid in second:
            row["second_pass"] = {"kind": second[rid]["kind"], "harmful": second[rid]["harmful"], "annotator": second[rid]["annotator"]}
        rows.append(row)
    rows.sort(key=lambda r: r["id"])
    write_jsonl(out, rows)
    return {"rows": len(rows), "harmful": sum(r["harmful"] for r in rows), "second_pass": sum("second_pass" in r for r in rows), "unlabelled": len(answers) - len(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("chunks", "merge"))
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(LABELS_FILE))
    args = parser.parse_args(argv)
    if args.action == "chunks":
        for path in make_chunks(Path(args.work)):
            print(path)
    else:
        print(json.dumps(merge(Path(args.work), Path(args.out))))


if __name__ == "__main__":
    main()
