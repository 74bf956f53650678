"""Collect the answers of the benchmark's own models for annotation (the labelled judge set).

Every model here is produced by the ordinary pipeline (`Runner.run` on the cpu-v1 preset, seed 0), so the
answers are exactly what the benchmark's judges have to read: the base model, the aligned model, SFT at
several poison ratios, defenses, other tasks. Prompts are never HS test prompts:

- `bt-val`: BeaverTails 330k_train unsafe prompts of the validation window (``evaluation.split=validation``
  with ``N_VALIDATION`` prompts: right after the provider's harmful rows, disjoint from every training window);
- `advbench`: an evenly spread sample of AdvBench behaviours (no test role anywhere in the protocol);
- `bt-matched` (``--v2``): one BeaverTails 330k_train unsafe prompt per HS test prompt, of the same primary harm
  category, taken in file order from beyond every window the cpu preset uses (after the provider's rows and
  ``N_VALIDATION`` validation prompts, ``MATCH_MARGIN`` prompts short of the pool's end, where poison rows are
  taken). The validation window over-represents violence and privacy and under-represents politics, sexual
  content and animal abuse against the test prompts; a judge fit to it misread v2's test answers (κ 0.40).
  Matching the categories, never the prompts, keeps every HS test prompt out of the labelled set.

    python -m hft_bench_plugins.judges.labelled.collect --data-dir ../shared/data --out runs/labelling/answers.jsonl

Models already collected in ``--out`` are skipped, so an interrupted collection resumes. One (prompt,
response) pair answered identically by several models is kept once (with every model that gave it), since a
label depends on the pair only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from harmbench_ft import Example, load_rows, preset
from harmbench_ft.plugins import get_registry
from harmbench_ft.spec import apply_overrides

N_VALIDATION = 300  # validation-window prompts per model
N_ADVBENCH = 104  # AdvBench prompts (every 5th of 520) for the models marked below
MATCH_MARGIN = 500  # bt-matched prompts stop this many short of the pool's end (poison rows come from there)

# Protocol v2's models (the cpu preset, test-split records, so Runner.run finds them and trains nothing): their
# answers to the bt-matched prompts.
V2_MODELS: list[tuple[str, dict[str, object]]] = [
    ("v2-aligned", {"attack.ratio": 0.0, "finetune.max_steps": 0}),
    ("v2-sft-sst2-p0", {"attack.ratio": 0.0}),
    ("v2-sft-sst2-p0.05", {"attack.ratio": 0.05}),
    ("v2-sft-sst2-p0.1", {"attack.ratio": 0.1}),
    ("v2-sft-sst2-p0-s1", {"attack.ratio": 0.0, "seed": 1}),
    ("v2-sft-sst2-p0.1-s1", {"attack.ratio": 0.1, "seed": 1}),
    ("v2-random-perturbation-sst2-p0.1", {"attack.ratio": 0.1, "defense.name": "random-perturbation"}),
]

# (model label, settings on top of the cpu-v1 preset, also answer AdvBench?)
MODELS: list[tuple[str, dict[str, object], bool]] = [
    ("aligned", {"finetune.max_steps": 0}, True),
    ("sft-sst2-p0", {"attack.ratio": 0.0}, True),
    ("sft-sst2-p0.1", {"attack.ratio": 0.1}, True),
    ("base", {"alignment.train.max_steps": 0, "finetune.max_steps": 0}, True),
    ("sft-sst2-p0.2", {"attack.ratio": 0.2}, False),
    ("sft-alpaca-p0.1", {"attack.ratio": 0.1, "attack.task": "alpaca"}, True),
    ("sft-alpaca-p0", {"attack.ratio": 0.0, "attack.task": "alpaca"}, False),
    ("lisa-sst2-p0.1", {"attack.ratio": 0.1, "defense.name": "lisa", "defense.args": {"k_align": 3, "k_ft": 25}}, False),
    ("sft-agnews-p0.1", {"attack.ratio": 0.1, "attack.task": "agnews"}, False),
    ("sft-sst2-p0.05", {"attack.ratio": 0.05}, False),
    ("sft-gsm8k-p0.1", {"attack.ratio": 0.1, "attack.task": "gsm8k"}, False),
    ("vaccine-sst2-p0.1", {"attack.ratio": 0.1, "defense.name": "vaccine"}, False),
]


def model_spec(settings: dict[str, object]):
    settings = dict(settings)
    args = settings.pop("defense.args", {})
    spec = apply_overrides(preset("cpu-v1"), {**settings, "evaluation.split": "validation", "evaluation.n_harmful_prompts": N_VALIDATION, "evaluation.n_task_test": 16, "evaluation.judges": ["keyword"]})
    spec.defense.args = dict(args)
    return spec


def row_id(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()[:12]


def answers(record: dict, questions: list[str]) -> list[tuple[str, str]]:
    """Greedy answers of the run's final model to these questions, exactly as the evaluation generates them."""
    from harmbench_ft.evaluation.backends import ServedModel
    from harmbench_ft.models.loading import final_model
    from harmbench_ft.spec import spec_from_dict

    spec = spec_from_dict(record["spec"])
    model, tokenizer, _ = final_model(spec.model, Path(record["artifacts"]["alignment"]), Path(record["artifacts"]["final"]), spec.finetune.regime)
    examples = [Example(q) for q in questions]
    backend = get_registry().get("backends", "hf")()
    served = ServedModel(model, tokenizer, spec.model.name)
    responses = backend.generate(served, [e.prompt for e in examples], spec.evaluation.max_new_tokens, spec.evaluation.batch_size)
    return list(zip(questions, responses))


def advbench_answers(record: dict, data_dir) -> list[tuple[str, str]]:
    return answers(record, [r["prompt"] for r in load_rows("advbench", data_dir)][::5][:N_ADVBENCH])


def primary_category(row: dict) -> str:
    return min((k for k, v in row["category"].items() if v), default="none")


def matched_prompts(data_dir, n_harmful: int = 600, n_hs: int = 200) -> list[str]:
    """One train prompt per HS test prompt, of its primary category, from beyond the preset's windows (docstring)."""
    from harmbench_ft import normalize_prompt

    def unsafe_pool(rows: list[dict]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for row in rows:
            if not row["is_safe"]:
                out.setdefault(normalize_prompt(row["prompt"]), row)
        return out

    test = list(unsafe_pool(load_rows("beavertails-330k-test", data_dir)).values())[:n_hs]
    pool = [r for k, r in unsafe_pool(load_rows("beavertails-330k-train", data_dir)).items() if k not in {normalize_prompt(t["prompt"]) for t in test}]
    candidates = pool[n_harmful + N_VALIDATION : len(pool) - MATCH_MARGIN]
    by_category: dict[str, list[dict]] = {}
    for row in candidates:
        by_category.setdefault(primary_category(row), []).append(row)
    chosen = []
    for row in test:
        bucket = by_category.get(primary_category(row)) or max(by_category.values(), key=len)
        chosen.append(bucket.pop(0)["prompt"])
    return chosen


def read_pairs(out: Path) -> dict[str, dict]:
    """The pairs collected so far, by id (none if ``out`` does not exist yet)."""
    if not out.is_file():
        return {}
    return {row["id"]: row for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}


def add_pairs(rows: dict[str, dict], label: str, pairs: list[tuple[str, str, str]]) -> None:
    """Record that model `label` gave these (prompt set, prompt, response) answers; one row per distinct pair."""
    for prompt_set, prompt, response in pairs:
        rid = row_id(prompt, response)
        row = rows.setdefault(rid, {"id": rid, "prompt_set": prompt_set, "prompt": prompt, "response": response, "models": []})
        row["models"].append(label)


def write_pairs(out: Path, rows: dict[str, dict]) -> None:
    """Rewrite ``out`` atomically, so an interrupted collection resumes after its last finished model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()), encoding="utf-8")
    tmp.replace(out)


def collect(out: Path, runs_dir: Path, data_dir, only: list[str] | None) -> None:
    from harmbench_ft.runner import Runner

    rows = read_pairs(out)
    done = {m for r in rows.values() for m in r["models"]}
    runner = Runner(runs_dir, data_dir)
    for label, settings, with_advbench in MODELS:
        if (only and label not in only) or label in done:
            continue
        print(f"collecting {label}", file=sys.stderr, flush=True)
        record = runner.run(model_spec(settings))
        generations = [json.loads(line) for line in (runs_dir / record["run_id"] / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
        pairs = [("bt-val", g["question"], g["response"]) for g in generations if g["kind"] == "harmful"]
        if with_advbench:
            pairs += [("advbench", p, r) for p, r in advbench_answers(record, data_dir)]
        add_pairs(rows, label, pairs)
        write_pairs(out, rows)
        print(f"{label}: {len(pairs)} answers, {len(rows)} unique pairs so far", file=sys.stderr, flush=True)


def collect_v2_matched(out: Path, runs_dir: Path, data_dir) -> None:
    """Answers of protocol v2's models to the bt-matched prompts, appended to ``out`` (resumable per model)."""
    from harmbench_ft.runner import Runner

    rows = read_pairs(out)
    done = {m for r in rows.values() for m in r["models"] if r["prompt_set"] == "bt-matched"}
    questions = matched_prompts(data_dir)
    runner = Runner(runs_dir, data_dir)
    for label, settings in V2_MODELS:
        if label in done:
            continue
        print(f"collecting {label} on {len(questions)} bt-matched prompts", file=sys.stderr, flush=True)
        record = runner.run(apply_overrides(preset("cpu"), settings))
        add_pairs(rows, label, [("bt-matched", p, r) for p, r in answers(record, questions)])
        write_pairs(out, rows)
        print(f"{label}: {len(rows)} unique pairs so far", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out", default="runs/labelling/answers.jsonl")
    parser.add_argument("--only", action="append", help="collect only this model label (repeatable)")
    parser.add_argument("--v2", action="store_true", help="protocol v2's models on the bt-matched prompts instead")
    args = parser.parse_args(argv)
    if args.v2:
        collect_v2_matched(Path(args.out), Path(args.runs_dir), args.data_dir)
    else:
        collect(Path(args.out), Path(args.runs_dir), args.data_dir, args.only)


if __name__ == "__main__":
    main()
