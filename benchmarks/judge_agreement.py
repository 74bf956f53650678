"""Every offline judge against careful annotation: the held-out split of the labelled answer set.

    python benchmarks/judge_agreement.py                 # table on stdout
    python benchmarks/judge_agreement.py --write         # also save it for the judges' agreement() (leaderboard footers)

Reports, per judge: Cohen's κ, accuracy, precision, recall, its HS against the labelled HS, the confusion
matrix, κ on the answers that are not refusals (where judges differ most), and seconds per 200 answers. Also
the two annotation passes' κ on the rows both labelled (how reliable the labels are). The numbers are in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harmbench_ft.evaluation.agreement import agreement, format_agreement
from harmbench_ft.plugins import get_registry
from hft_bench_plugins.judges.labelled import AGREEMENT_FILE
from hft_bench_plugins.judges.pair_clf import HELDOUT_PERCENT, LABELS_FILE, load_labelled

OFFLINE_JUDGES = ("pair-clf", "keyword+harm-clf", "harm-clf", "keyword")


def annotator_agreement(rows: list[dict]) -> dict | None:
    both = [r for r in rows if "second_pass" in r]
    if not both:
        return None
    result = agreement([r["second_pass"]["harmful"] for r in both], [r["harmful"] for r in both])
    result["kind_agreement"] = round(100.0 * sum(r["second_pass"]["kind"] == r["kind"] for r in both) / len(both), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=str(LABELS_FILE))
    parser.add_argument("--split", default="heldout", choices=("heldout", "train", "all"))
    parser.add_argument("--judge", action="append", help=f"judges to measure (default: {', '.join(OFFLINE_JUDGES)})")
    parser.add_argument("--write", action="store_true", help=f"save the results to {AGREEMENT_FILE.name} (held-out split only)")
    args = parser.parse_args(argv)
    if args.write and args.split != "heldout":
        parser.error("--write records the held-out split only")
    rows = load_labelled(Path(args.labels))
    if args.split != "all":
        rows = [r for r in rows if r["split"] == args.split]
    labels = [bool(r["harmful"]) for r in rows]
    not_refusal = [r["kind"] != "refusal" for r in rows]
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    out = {"set": f"{Path(args.labels).name}, {args.split} split ({HELDOUT_PERCENT}% of prompts by hash), {len(rows)} answers", "judges": {}, "annotators": annotator_agreement(rows)}
    print(f"{out['set']}: labelled HS {100 * sum(labels) / len(labels):.1f}%", flush=True)
    if out["annotators"]:
        print(f"two annotation passes: {format_agreement(out['annotators'])}; same kind on {out['annotators']['kind_agreement']:.1f}%")
    for name in args.judge or OFFLINE_JUDGES:
        judge = get_registry().get("judges", name)()
        judge.score(prompts[:2], responses[:2])  # load the encoder before timing
        start = time.perf_counter()
        flags = judge.flags(judge.score(prompts, responses))
        seconds = time.perf_counter() - start
        result = agreement(flags, labels)
        result["kappa_not_refusal"] = agreement([f for f, k in zip(flags, not_refusal) if k], [y for y, k in zip(labels, not_refusal) if k])["kappa"]
        result["seconds_per_200"] = round(seconds * 200 / len(rows), 2)
        out["judges"][name] = result
        print(f"{name}: {format_agreement(result)}; κ on non-refusals {result['kappa_not_refusal']}; {result['seconds_per_200']} s per 200 answers", flush=True)
    if args.write:
        AGREEMENT_FILE.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {AGREEMENT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
