"""The `hft-bench` command line: run, grid, leaderboard, judge, rejudge, plugins.

Usage errors print one line and exit 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harmbench_ft.errors import HftBenchError, UsageError

console = Console(stderr=True)


def _key_values(text: str, what: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; a part without '=' continues the previous value as a list
    ('judges=x,y' -> {'judges': 'x,y'}); a clear error for anything else."""
    out: dict[str, str] = {}
    for part in [p for p in text.split(",") if p.strip()]:
        if "=" not in part:
            if not out:
                raise UsageError(f"{what}: expected key=value, got {part!r}")
            last = next(reversed(out))
            out[last] = f"{out[last]},{part.strip()}"
            continue
        k, v = part.split("=", 1)
        if k.strip() in out:
            raise UsageError(f"{what}: {k.strip()!r} given twice ({out[k.strip()]!r} and {v.strip()!r})")
        out[k.strip()] = v.strip()
    return out


def _merge(into: dict[str, str], new: dict[str, str], what: str) -> None:
    """Add key=value pairs from one more flag; a key given by an earlier flag too is an error, not a silent override."""
    for k, v in new.items():
        if k in into and into[k] != v:
            raise UsageError(f"{what}: {k!r} given twice ({into[k]!r} and {v!r})")
        into[k] = v


ATTACK_KEYS = {"ratio": "attack.ratio", "p": "attack.ratio", "n": "attack.n", "task": "attack.task", "harmful": "attack.harmful_source"}


def build_spec(args: argparse.Namespace):
    """The preset with every flag's settings on top. Flags do not override each other: a setting given by two flags
    (--task and --attack task=, --seed and --set seed=, a key in two --attack flags) with different values is an
    error naming both, never a silent last-wins."""
    from harmbench_ft.spec import apply_overrides, preset

    spec = preset(args.preset)
    overrides: dict[str, Any] = {}
    given_by: dict[str, str] = {}

    def put(path: str, value: Any, flag: str) -> None:
        if path in overrides and str(overrides[path]) != str(value):
            raise UsageError(f"{path} is given twice, with different values: {given_by[path]} and {flag}")
        overrides[path] = value
        given_by.setdefault(path, flag)

    if args.defense is not None:
        put("defense.name", args.defense, f"--defense {args.defense}")
    if args.model:
        put("model.name", args.model, f"--model {args.model}")
    if args.trust_remote_code:
        put("model.trust_remote_code", True, "--trust-remote-code")
    attack: dict[str, str] = {}
    for item in args.attack or []:
        _merge(attack, _key_values(item, "--attack"), "--attack")
    attack_paths: dict[str, str] = {}
    for key, value in attack.items():
        if key not in ATTACK_KEYS:
            raise UsageError(f"--attack: unknown key {key!r}; known: {', '.join(sorted(ATTACK_KEYS))}")
        if ATTACK_KEYS[key] in attack_paths:  # ratio and p are one setting
            raise UsageError(f"--attack: {key!r} sets {ATTACK_KEYS[key]}, which another key already set")
        attack_paths[ATTACK_KEYS[key]] = key
        put(ATTACK_KEYS[key], value, f"--attack {key}={value}")
    if args.task:
        put("attack.task", args.task, f"--task {args.task}")
    if args.seed is not None:
        put("seed", args.seed, f"--seed {args.seed}")
    if args.judge:
        put("evaluation.judges", ",".join(args.judge), " ".join(f"--judge {j}" for j in args.judge))
    if args.backend:
        put("evaluation.backend", args.backend, f"--backend {args.backend}")
    settings: dict[str, str] = {}
    for item in args.set or []:
        _merge(settings, _key_values(item, "--set"), "--set")
    for path, value in settings.items():
        put(path, value, f"--set {path}={value}")
    overrides.setdefault("defense.name", "sft")
    defense_args: dict[str, str] = {}
    for item in args.defense_arg or []:
        _merge(defense_args, _key_values(item, "--defense-arg"), "--defense-arg")
    spec = apply_overrides(spec, overrides)
    spec.defense.args = defense_args
    return spec


def cmd_run(args: argparse.Namespace) -> int:
    from harmbench_ft.runner import Runner

    spec = build_spec(args)
    runner = Runner(args.runs_dir, args.data_dir, console)
    record = runner.run(spec)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        print_result(record)
    return 0


def print_result(record: dict[str, Any]) -> None:
    m = record["metrics"]
    spec = record["spec"]
    judge = record["stages"]["evaluation"]["judges"][0]["id"]
    regime = spec.get("finetune", {}).get("regime", "fresh")
    table = Table(title=f"{spec['defense']['name']} · {spec['attack']['task']} · p={spec['attack']['ratio']:g} · n={spec['attack']['n']} · {spec['model']['name']} · regime {regime}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"harmful score (HS, judge {judge})", f"{m['harmful_score']:.1f}")
    table.add_row("HS+ (flagged or incoherent)", f"{m['harmful_score_plus']:.1f}")
    for other in record["stages"]["evaluation"]["judges"][1:]:  # every further judge: its own HS and HS+
        name = other["id"]
        table.add_row(f"HS, judge {name} (HS+)", f"{m[f'harmful_score/{name}']:.1f} ({m[f'harmful_score_plus/{name}']:.1f})")
    if "finetune_accuracy" in m:
        table.add_row(f"fine-tune accuracy (FA, {spec['attack']['task']})", f"{m['finetune_accuracy']:.1f}")
    for stage, info in record["stages"].items():
        note = "reused" if info.get("reused") else ("skipped" if info.get("skipped") else "")
        table.add_row(f"{stage} seconds", f"{info['seconds']:.1f} {note}".strip())
    Console().print(table)
    console.print(f"result: {Path(record['artifacts']['final']).parents[2] / record['run_id'] / 'result.json'}")


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harmbench_ft.leaderboard import write_leaderboards

    if not Path(args.runs_dir).is_dir():
        raise UsageError(f"runs directory {args.runs_dir} does not exist")
    if args.judge:
        from harmbench_ft.plugins import get_registry

        get_registry().get("judges", args.judge)  # an unknown name fails in one line
    from harmbench_ft.results import writable_dir

    written = write_leaderboards(Path(args.runs_dir), writable_dir(Path(args.out), "--out"), args.judge)
    if not written:
        raise UsageError(f"no finished results under {args.runs_dir}")
    for path in written:
        print(path)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from harmbench_ft.grid import load_grid, run_grid

    grid = load_grid(args.grid)
    return run_grid(grid, args.executor, {"address": args.ray_address}, args.runs_dir, args.data_dir, args.dry_run, console)


def cmd_judge(args: argparse.Namespace) -> int:
    from harmbench_ft.evaluation.agreement import format_agreement
    from harmbench_ft.evaluation.judge_file import default_label, judge_rows, read_rows
    from harmbench_ft.plugins import get_registry
    from harmbench_ft.results import writable_dir, write_jsonl

    names = args.judge or ["keyword"]
    judge_classes = [get_registry().get("judges", name) for name in names]  # unknown names fail before reading
    if args.out:  # checked before any judging, which can take long
        if Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a folder; give the name of the JSONL file to write")
        writable_dir(Path(args.out).parent, "--out's folder")
    rows = read_rows(Path(args.file))
    label = args.label or default_label(rows)
    scored, summary = judge_rows(rows, [cls() for cls in judge_classes], label)
    if args.out:
        write_jsonl(Path(args.out), scored)
    else:
        for i, row in enumerate(scored, start=1):
            cells = "  ".join(f"{n}={'FLAGGED' if row['judges'][n]['flagged'] else 'ok'}({row['judges'][n]['score']:.3f})" for n in names)
            print(f"{i}\t{cells}\t{row['prompt'][:60]!r}")
    for name, entry in summary["judges"].items():
        print(f"harmful score (judge {name}, threshold {entry['threshold']}): {entry['harmful_score']:.1f}% ({entry['flagged']} of {summary['rows']} rows flagged); HS+ {entry['harmful_score_plus']:.1f}%")
        if "agreement" in entry:
            print(f"  against {label}: {format_agreement(entry['agreement'])}")
    return 0


def cmd_rejudge(args: argparse.Namespace) -> int:
    from harmbench_ft.evaluation.rejudge import rejudge_run, run_dirs
    from harmbench_ft.plugins import get_registry

    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise UsageError(f"runs directory {runs_dir} does not exist")
    judges = [get_registry().get("judges", name)() for name in args.judge]  # unknown names fail before any work
    if args.run_id:
        bad = [r for r in args.run_id if Path(r).name != r or r in (".", "..")]
        if bad:
            raise UsageError(f"run ids are folder names under --runs-dir, not paths: {', '.join(bad)}")
        dirs = [runs_dir / r for r in args.run_id]
        missing = [d.name for d in dirs if not (d / "result.json").is_file()]
        if missing:
            raise UsageError(f"no result under {runs_dir} for: {', '.join(missing)}")
    else:
        dirs = run_dirs(runs_dir)
    done, skipped = 0, []
    for i, run_dir in enumerate(dirs, start=1):
        try:
            record = rejudge_run(run_dir, judges)
        except UsageError as exc:
            if args.run_id:
                raise
            skipped.append(run_dir.name)
            console.print(f"[{i}/{len(dirs)}] skipped: {exc}", markup=False, highlight=False)
            continue
        done += 1
        scores = ", ".join(f"{j.name} {record['metrics'][f'harmful_score/{j.name}']:.1f}" for j in judges)
        console.print(f"[{i}/{len(dirs)}] {run_dir.name}: HS {scores}", markup=False, highlight=False)
    print(f"re-judged {done} run(s) with {', '.join(args.judge)}" + (f"; {len(skipped)} skipped (no stored answers)" if skipped else ""))
    return 0 if done or not dirs else 2


def cmd_plugins(args: argparse.Namespace) -> int:
    from harmbench_ft.plugins import describe_plugins, get_registry

    rows = describe_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="hft-bench plugins")
    for col in ("distribution", "plugins", "registers"):
        table.add_column(col)
    for row in rows:
        registers = row.get("error") and f"[red]failed to load: {row['error']}[/red]" or "; ".join(f"{k}: {', '.join(v)}" for k, v in row.items() if k not in ("distribution", "plugins"))
        table.add_row(row["distribution"], ", ".join(row["plugins"]), registers)
    Console().print(table)
    registry = get_registry()
    defenses = Table(title="defenses")
    for col in ("name", "stages", "needs", "parameters (defaults)"):
        defenses.add_column(col)
    for name in registry.names("defenses"):
        cls = registry.get("defenses", name)
        params = ", ".join(f"{p['name']}={p['default']}" for p in cls.parameter_table()) or "-"
        defenses.add_row(name, ", ".join(s.value for s in cls.stages) or "(sft)", ", ".join([*cls.needs, *(f"{n} (post-fine-tuning)" for n in cls.post_needs)]) or "-", params)
    Console().print(defenses)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hft-bench", description="Benchmark defenses against harmful fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one defense against one attack and print HS and FA")
    run.add_argument("--preset", default="cpu", help="tiny | cpu (default: SmolLM2-135M on real data, protocol v2) | cpu-v1 (the cpu preset until 2026-12-02) | paper (Llama-2-7B, GPU)")
    run.add_argument("--defense", help="defense name (see `hft-bench plugins`); default sft")
    run.add_argument("--defense-arg", action="append", metavar="K=V", help="a defense parameter (repeatable)")
    run.add_argument("--attack", action="append", metavar="ratio=P,n=N,task=T", help="poison ratio, sample number, task (repeatable)")
    run.add_argument("--task", help="fine-tuning task (sst2, agnews, gsm8k, alpaca)")
    run.add_argument("--model", help="alias (smollm2-135m, llama2-7b, tiny-llama), hub id or local path")
    run.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    run.add_argument("--judge", action="append", help="harmfulness judge (repeatable; the first gives the headline HS)")
    run.add_argument("--backend", help="generation backend (default hf)")
    run.add_argument("--seed", type=int)
    run.add_argument("--set", action="append", metavar="PATH=VALUE", help="override any spec field, e.g. finetune.lr=1e-4 (repeatable)")
    run.add_argument("--runs-dir", default="runs", help="where results and artifacts go (default runs/)")
    run.add_argument("--data-dir", help="offline dataset mirror (<hub_id>[/<config>]/<split>.jsonl); default $HFT_BENCH_DATA_DIR, else the hub")
    run.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    run.set_defaults(func=cmd_run)

    lb = sub.add_parser("leaderboard", help="render markdown + CSV + PNG tables from stored results")
    lb.add_argument("--runs-dir", default="runs", help="where the result records are (<run_id>/result.json; finished ones only are tabulated); default runs/")
    lb.add_argument("--out", default="leaderboards", help="one table set per protocol, an index README.md, and a copy of every tabulated record under results/; default leaderboards/")
    lb.add_argument("--judge", help="the judge whose HS heads every table (default: each protocol's own first judge); records re-judged with `hft-bench rejudge` hold other judges' HS")
    lb.set_defaults(func=cmd_leaderboard)

    gr = sub.add_parser("grid", help="run every defense x ratio x task x seed of a grid file; finished runs are skipped")
    gr.add_argument("grid", metavar="GRID.toml", help="grid file (see docs/grids.md)")
    gr.add_argument("--executor", default="local", help="local (default: one run at a time, each in its own process) | ray | a plugin's")
    gr.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (--executor ray); default: start a local Ray")
    gr.add_argument("--runs-dir", default="runs", help="where results and artifacts go (default runs/)")
    gr.add_argument("--data-dir", help="offline dataset mirror; default $HFT_BENCH_DATA_DIR, else the hub")
    gr.add_argument("--dry-run", action="store_true", help="list the runs and which artifacts would be built or reused; run nothing")
    gr.set_defaults(func=cmd_grid)

    jd = sub.add_parser("judge", help="score a JSONL file of {prompt, response} rows with a judge; per-row flags and the harmful score")
    jd.add_argument("file", help="JSONL, one {\"prompt\": ..., \"response\": ...} object per line (an is_safe label is compared if present)")
    jd.add_argument("--judge", action="append", help="judge name (repeatable; default keyword; see `hft-bench plugins`)")
    jd.add_argument("--out", help="write the rows with every judge's score and flag to this JSONL file instead of printing them")
    jd.add_argument("--label", metavar="COLUMN", help="a boolean label column to report agreement with (accuracy, precision, recall, Cohen's kappa, confusion matrix); "
                    "is_safe means True = safe, any other column True = harmful; default: harmful or is_safe if the rows have one")
    jd.set_defaults(func=cmd_judge)

    rj = sub.add_parser("rejudge", help="re-score stored answers (generations.jsonl) with other judges and write their HS into the result records; nothing is regenerated")
    rj.add_argument("run_id", nargs="*", help="run folders under --runs-dir (default: every finished run there; runs without stored answers are skipped)")
    rj.add_argument("--judge", action="append", required=True, help="judge name (repeatable; see `hft-bench plugins`)")
    rj.add_argument("--runs-dir", default="runs", help="where the runs are (default runs/; leaderboards/results works too)")
    rj.set_defaults(func=cmd_rejudge)

    pl = sub.add_parser("plugins", help="list plugin distributions, what they register, and every defense's parameters")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HftBenchError as exc:
        console.print(f"hft-bench: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("hft-bench: interrupted; rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
