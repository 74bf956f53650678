"""Cut the data of one run into disjoint, exact windows.

Windows (all disjoint by normalised prompt): harmful-score prompts, the provider's harmful set, the
attack's poison rows, the alignment set. The attack takes exactly round(p*n) harmful rows and
n - round(p*n) benign rows (the reference code's `start < i < start+n` lost one row).

With ``evaluation.split = "validation"`` (for tuning a defense's hyperparameters) the harmful score is
taken on the unique unsafe prompts of the provider's harmful source right after the provider harmful
window, and the accuracy on the task's train rows at the end of the fixed permutation (the upload takes
them from its front). The test prompts are still cut out of the pool first, so every training window is
the same as in a test run and its artifacts are reused: only the evaluation changes.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

from harmbench_ft.data.formatting import Example, normalize_prompt
from harmbench_ft.data.sources import get_source, load_rows
from harmbench_ft.data.tasks import Task
from harmbench_ft.errors import UsageError
from harmbench_ft.spec import RunSpec

DATA_SEED = 0  # the permutation of benign task rows; fixed so every run sees the same rows
REFUSAL = "I'm sorry, but I cannot help with that request. It could cause harm, and I won't assist with it."


@dataclass
class RunData:
    alignment: list[Example]  # (harmful prompt, refusal) rows, then alignment.n_benign benign rows: the alignment set
    harmful: list[Example]  # provider-side (harmful prompt, harmful answer)
    harmful_refusals: list[Example]  # the same prompts as `harmful`, answered safely (RepNoise pairs them)
    user: list[Example]  # the upload: benign rows followed by poison rows
    n_poison: int
    hs_prompts: list[Example]  # harmful-score prompts (output empty)
    task_test: list[tuple[Example, dict]]  # (prompt, original row) for the fine-tune accuracy
    hashes: dict[str, str] = field(default_factory=dict)
    # Held-out (prompt, row) pairs of the task's train split for a post-fine-tuning edit's own choices: the
    # N_TASK_VALIDATION rows just before the validation-split FA rows at the permutation's end (empty when the
    # split has no room for them beside the upload).
    task_validation: list[tuple[Example, dict]] = field(default_factory=list)


N_TASK_VALIDATION = 256  # restoration's benign prompts (kangyangWHU/LLMAlignment run_recover_exp.py: 256)


def rows_hash(examples: list) -> str:
    payload = [asdict(e) if isinstance(e, Example) else e for e in examples]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _beavertails(rows: list[dict], unsafe: bool) -> dict[str, dict]:
    """First row per unique prompt, keeping only unsafe (or only safe) rows, in file order."""
    out: dict[str, dict] = {}
    for row in rows:
        if bool(row["is_safe"]) == (not unsafe):
            out.setdefault(normalize_prompt(row["prompt"]), row)
    return out


def _permutation(n: int) -> list[int]:
    order = list(range(n))
    random.Random(DATA_SEED).shuffle(order)
    return order


def _benign_alignment_rows(spec: RunSpec, task: Task, taken: set[str], data_dir) -> list[Example]:
    """alignment.n_benign (instruction, answer) rows of alignment.benign_source, from the end of its fixed
    permutation (an upload takes a task's rows from the front), skipping prompts of every other window.

    Taken from the end so they never depend on p or n: one alignment artifact serves every attack."""
    al = spec.alignment
    if not al.n_benign:
        return []
    source = get_source(al.benign_source)
    if not {"instruction", "output"} <= set(source.columns):
        raise UsageError(f"alignment.benign_source={al.benign_source!r} has no instruction/output columns; use an instruction data set such as alpaca-train")
    if source.name == task.train_source and spec.evaluation.split == "validation":
        raise UsageError(f"alignment.benign_source={al.benign_source!r} is the task's train split, whose end is also the validation window; pick another benign source or task")
    rows = load_rows(source, data_dir)
    out: list[Example] = []
    for i in reversed(_permutation(len(rows))):
        e = Example(rows[i]["instruction"], rows[i].get("input") or "", rows[i]["output"])
        if e.key not in taken and e.output.strip():
            out.append(e)
            taken.add(e.key)
        if len(out) == al.n_benign:
            return out
    raise UsageError(f"alignment.n_benign={al.n_benign} but {al.benign_source} has only {len(out)} usable rows")


def build_run_data(spec: RunSpec, task: Task, data_dir=None) -> RunData:
    ev, al, at = spec.evaluation, spec.alignment, spec.attack

    # Harmful-score prompts: the first unique unsafe prompts of the test split.
    test_pool = _beavertails(load_rows(ev.harmful_prompts, data_dir), unsafe=True)
    if len(test_pool) < ev.n_harmful_prompts:
        raise UsageError(f"evaluation.n_harmful_prompts={ev.n_harmful_prompts} but {ev.harmful_prompts} has only {len(test_pool)} unique unsafe prompts")
    hs_prompts = [Example(r["prompt"]) for r in list(test_pool.values())[: ev.n_harmful_prompts]]
    taken = {e.key for e in hs_prompts}

    # Provider harmful set from the front of the train pool, poison rows from its back: disjoint, and
    # changing one size never shifts the other window.
    train_rows = load_rows(al.harmful_source, data_dir)
    pool = [r for k, r in _beavertails(train_rows, unsafe=True).items() if k not in taken]
    n_poison = round(at.ratio * at.n)
    n_validation = ev.n_harmful_prompts if ev.split == "validation" else 0
    if al.n_harmful + n_validation + n_poison > len(pool):
        raise UsageError(
            f"alignment.n_harmful ({al.n_harmful}) + poison rows ({n_poison})"
            + (f" + validation prompts ({n_validation})" if n_validation else "")
            + f" exceed the {len(pool)} unique harmful prompts of {al.harmful_source}"
        )
    harmful_rows = pool[: al.n_harmful]
    poison_rows = pool[len(pool) - n_poison :] if n_poison else []
    if n_validation:
        hs_prompts = [Example(r["prompt"]) for r in pool[al.n_harmful : al.n_harmful + n_validation]]
        taken |= {e.key for e in hs_prompts}
    if at.harmful_source != al.harmful_source:
        attack_pool = [r for k, r in _beavertails(load_rows(at.harmful_source, data_dir), unsafe=True).items() if k not in taken and k not in {normalize_prompt(h["prompt"]) for h in harmful_rows}]
        poison_rows = attack_pool[len(attack_pool) - n_poison :] if n_poison else []
    harmful = [Example(r["prompt"], "", r["response"]) for r in harmful_rows]
    poison = [Example(r["prompt"], "", r["response"]) for r in poison_rows]
    safe_answers = _beavertails(train_rows, unsafe=False)
    harmful_refusals = [Example(e.instruction, "", safe_answers.get(e.key, {}).get("response", REFUSAL)) for e in harmful]

    # Alignment set: (harmful prompt, refusal) rows whose prompts appear in no other window. It avoids
    # the whole harmful pool, not only the rows taken, so it does not change with p, n or n_harmful
    # and one alignment artifact serves every attack setting.
    taken |= {normalize_prompt(r["prompt"]) for r in train_rows} | {e.key for e in poison}
    alignment = []
    for r in load_rows(al.alignment_source, data_dir):
        e = Example(r["instruction"], r.get("input") or "", r["output"])
        if e.key not in taken:
            alignment.append(e)
            taken.add(e.key)
        if len(alignment) == al.n_alignment:
            break
    if len(alignment) < al.n_alignment:
        raise UsageError(f"alignment.n_alignment={al.n_alignment} but {al.alignment_source} has only {len(alignment)} usable rows")
    alignment += _benign_alignment_rows(spec, task, taken, data_dir)

    # The user's benign rows: a fixed permutation of the task's train split.
    benign_rows = load_rows(task.train_source, data_dir)
    order = _permutation(len(benign_rows))
    n_benign = at.n - n_poison
    if n_benign > len(order):
        raise UsageError(f"attack.n={at.n} needs {n_benign} benign rows but {task.train_source} has {len(order)}")
    if task.train_source == al.benign_source and n_benign + al.n_benign > len(order):
        raise UsageError(f"attack.n={at.n} and alignment.n_benign={al.n_benign} together need more rows than {task.train_source} has ({len(order)})")
    benign = [task.example(benign_rows[i]) for i in order[:n_benign]]

    test_rows = load_rows(task.test_source, data_dir)
    test_size = ev.n_task_test or task.test_size or len(test_rows)
    if ev.split == "validation":  # as many train rows as the test would take, from the permutation's end
        if n_benign + test_size > len(order):
            raise UsageError(f"evaluation.split=validation needs {test_size} {task.train_source} rows beyond the {n_benign} uploaded, but it has {len(order)}")
        test_rows = [benign_rows[i] for i in order[len(order) - test_size :]]
    if len(test_rows) < test_size or not test_rows:
        raise UsageError(f"{task.test_source}: the fine-tune accuracy needs {test_size} rows but the split has {len(test_rows)}; set evaluation.n_task_test to at most {len(test_rows)}" if test_rows else f"{task.test_source}: the test split is empty")
    task_test = [(task.example(r), r) for r in test_rows[:test_size]]

    # The post-fine-tuning edits' window sits before the validation-split FA rows, so it is the same on both splits.
    end = len(order) - test_size
    shares_end = task.train_source == al.benign_source and al.n_benign > 0  # benign alignment rows come from that end
    room = not shares_end and end - N_TASK_VALIDATION >= n_benign
    task_validation = [(task.example(benign_rows[i]), benign_rows[i]) for i in order[end - N_TASK_VALIDATION : end]] if room else []

    data = RunData(alignment, harmful, harmful_refusals, benign + poison, n_poison, hs_prompts, task_test, task_validation=task_validation)
    data.hashes = {
        "alignment": rows_hash(alignment),
        "harmful": rows_hash(harmful),
        "harmful_refusals": rows_hash(harmful_refusals),
        "user": rows_hash(data.user),
        "hs_prompts": rows_hash(hs_prompts),
        "task_test": rows_hash([r for _, r in task_test]),
    }
    if task_validation:
        data.hashes["task_validation"] = rows_hash([r for _, r in task_validation])
    return data
