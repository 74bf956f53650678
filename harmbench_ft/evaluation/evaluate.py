"""Generate on the harmful-score prompts and the task's test set; judge, score, and keep every sample.

Every number can be traced to ``generations.jsonl``: per sample the prompt as rendered for the model, the
question the judges saw, the response, every judge's score and flag, incoherence (for HS+), and for task
samples the reference and the verdict.
"""

from __future__ import annotations

from typing import Any

from harmbench_ft.data.tasks import Task
from harmbench_ft.data.windows import RunData
from harmbench_ft.evaluation.backends import Backend, ServedModel
from harmbench_ft.evaluation.judges import Judge, incoherent
from harmbench_ft.spec import EvalSpec


def percent(flags: list[bool]) -> float:
    return round(100.0 * sum(flags) / len(flags), 2) if flags else float("nan")


def evaluate(served: ServedModel, data: RunData, task: Task, judges: list[Judge], backend: Backend, ev: EvalSpec) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (percent) and one record per sample.

    Each judge gives its own columns ``harmful_score/<judge>`` and ``harmful_score_plus/<judge>``; the first
    judge also gives the headline ``harmful_score`` (the result records which judge that is).
    """
    hs_prompts = [e.prompt for e in data.hs_prompts]
    hs_responses = backend.generate(served, hs_prompts, ev.max_new_tokens, ev.batch_size)
    questions = [e.instruction for e in data.hs_prompts]  # judges see the question, not the Alpaca wrapper
    samples: list[dict[str, Any]] = [
        {"kind": "harmful", "index": i, "prompt": p, "question": q, "response": r, "incoherent": incoherent(r), "judges": {}}
        for i, (p, q, r) in enumerate(zip(hs_prompts, questions, hs_responses))
    ]
    metrics: dict[str, float] = {}
    for i, judge in enumerate(judges):
        scores = judge.score(questions, hs_responses)
        flags = judge.flags(scores)
        for sample, s, f in zip(samples, scores, flags):
            sample["judges"][judge.name] = {"score": s, "flagged": f}
        hs = percent(flags)
        hs_plus = percent([f or s["incoherent"] for f, s in zip(flags, samples)])
        metrics[f"harmful_score/{judge.name}"] = hs
        metrics[f"harmful_score_plus/{judge.name}"] = hs_plus
        if i == 0:
            metrics["harmful_score"], metrics["harmful_score_plus"] = hs, hs_plus

    accuracy, task_samples = task_accuracy(served, data.task_test, task, backend, ev.task_max_new_tokens or task.max_new_tokens, ev.batch_size)
    samples += task_samples
    if task.scored:
        metrics["finetune_accuracy"] = accuracy
    return metrics, samples


def task_accuracy(served: ServedModel, rows: list, task: Task, backend: Backend, max_new_tokens: int, batch_size: int) -> tuple[float, list[dict[str, Any]]]:
    """Percent correct on (Example, row) pairs (nan for an unscored task), and one sample record per row."""
    prompts = [e.prompt for e, _ in rows]
    responses = backend.generate(served, prompts, max_new_tokens, batch_size)
    samples, verdicts = [], []
    for i, ((example, row), prompt, response) in enumerate(zip(rows, prompts, responses)):
        correct = task.score(response, row) if task.scored else None
        verdicts.append(correct)
        samples.append({"kind": "task", "index": i, "task": task.name, "prompt": prompt, "response": response, "reference": example.output, "correct": correct})
    return (percent([bool(v) for v in verdicts]) if task.scored else float("nan")), samples
