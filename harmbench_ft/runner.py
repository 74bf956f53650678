"""The staged runner: alignment -> fine-tuning -> post-fine-tuning -> evaluation.

Each training stage writes an artifact (a LoRA adapter, safetensors) under
``<runs-dir>/artifacts/<stage>/<key>/`` whose key hashes exactly the inputs of that stage, so an
artifact is reused by every run that shares those inputs, and a killed run resumes at the stage it
was in. The alignment key does not contain the defense's name unless the defense acts on the
alignment stage: sft, lisa, panacea and random-perturbation share one alignment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from harmbench_ft import results
from harmbench_ft.data.windows import RunData, build_run_data
from harmbench_ft.defense import Defense, PostContext, Stage
from harmbench_ft.errors import HftBenchError, UsageError
from harmbench_ft.evaluation.backends import ServedModel
from harmbench_ft.evaluation.evaluate import evaluate, task_accuracy
from harmbench_ft.events import RunEnd, RunStart, StageEnd, StageStart
from harmbench_ft.models.loading import add_lora, check_lora_targets, check_model_name, final_model, finetune_adapter, load_adapter, load_base, merge_adapter, model_linear_names, save_full_weights, trainable_parameters, under_finetune
from harmbench_ft.plugins import emit, get_registry
from harmbench_ft.spec import RunSpec, hashed_args, stable_hash, train_key, validate
from harmbench_ft.training.batches import BatchStream, pair_streams, steps_for
from harmbench_ft.training.loop import Checkpoints, train

ARTIFACT_FILE = "artifact.json"  # written last: an artifact folder without it is not an artifact


def file_sha256(path: Path) -> str | None:
    """Hex sha256 of a file, None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a built artifact, by path relative to it, recorded in its artifact.json."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ARTIFACT_FILE}
DEFENSE_STATE_FILE = "defense_state.safetensors"
STAGES = ("alignment", "finetune", "post_finetune", "evaluation")


def is_input_error(exc: BaseException) -> bool:
    """Bad input (exit code 2), as opposed to a crash or an environment fault, which leave an error.json."""
    return isinstance(exc, HftBenchError) and exc.exit_code == 2


def resolve(spec: RunSpec) -> tuple[RunSpec, Defense]:
    """Validate the spec and fill in what it leaves to a plugin (the defense's default arguments, the
    task's answer budget), so the hash is canonical."""
    validate(spec)
    check_model_name(spec.model)
    registry = get_registry()
    defense_cls = registry.get("defenses", spec.defense.name)
    params = defense_cls.make_params(spec.defense.args)
    task = registry.get("tasks", spec.attack.task)
    for judge in spec.evaluation.judges:
        registry.get("judges", judge)
    registry.get("backends", spec.evaluation.backend)
    resolved = dataclasses.replace(spec, defense=dataclasses.replace(spec.defense, args=dataclasses.asdict(params)))
    if spec.evaluation.task_max_new_tokens is None:  # the task's own budget, written into the spec (and its hash)
        resolved = dataclasses.replace(resolved, evaluation=dataclasses.replace(spec.evaluation, task_max_new_tokens=task.max_new_tokens))
    return resolved, defense_cls(params)


@dataclass
class StagePlan:
    """The artifact keys of a run, computed before anything is trained (also used by --dry-run)."""

    alignment: str
    finetune: str
    post_finetune: str | None  # None: the defense does not edit after fine-tuning
    inputs: dict[str, Any] = field(default_factory=dict)


def plan_stages(spec: RunSpec, defense: Defense, data: RunData) -> StagePlan:
    acts = set(defense.stages)
    params = hashed_args(defense.name, spec.defense.args)
    data_for = lambda stage_sources: {s: data.hashes[s] for s in sorted(stage_sources)}  # noqa: E731
    align_inputs = {
        "model": dataclasses.asdict(spec.model),
        "procedure": defense.name if Stage.ALIGNMENT in acts else "sft",
        "params": params if Stage.ALIGNMENT in acts else {},
        "train": train_key(dataclasses.asdict(spec.alignment.train)),
        "data": data_for({"alignment", *(defense.needs if Stage.ALIGNMENT in acts else ())}),
        "seed": spec.seed,
    }
    alignment = stable_hash(align_inputs)
    ft_inputs = {
        "alignment": alignment,
        "procedure": defense.name if Stage.FINETUNE in acts else "sft",
        "params": params if Stage.FINETUNE in acts else {},
        "train": train_key(dataclasses.asdict(spec.finetune)),
        "data": data_for({"user", *(defense.needs if Stage.FINETUNE in acts else ())}),
        "seed": spec.seed,
    }
    finetune = stable_hash(ft_inputs)
    post_inputs = {"finetune": finetune, "procedure": defense.name, "params": params, "seed": spec.seed}
    if defense.post_needs:  # the data an edit reads (none for random perturbation and Panacea, whose keys stay as they were)
        post_inputs["data"] = {s: data.hashes.get(s) for s in sorted(defense.post_needs)}
    post = stable_hash(post_inputs) if Stage.POST_FINETUNE in acts else None
    return StagePlan(alignment, finetune, post, {"alignment": align_inputs, "finetune": ft_inputs})


class Runner:
    def __init__(self, runs_dir: str | Path = "runs", data_dir: str | Path | None = None, console: Console | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.data_dir = data_dir
        self.console = console or Console(stderr=True)

    # -- paths --------------------------------------------------------------------------------------

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.runs_dir / "artifacts" / stage / key[:20]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs_dir / spec.run_id()

    @staticmethod
    def finished_result(run_dir: Path, data: RunData) -> dict[str, Any] | None:
        """The run's finished record, if it was computed from exactly these data rows; a record whose rows differ
        (the mirror changed under the same spec) is an error, not a result to reuse."""
        record = results.read_result(run_dir)
        if record is None:
            return None
        stored = record.get("data", {}).get("hashes", {})
        changed = sorted(k for k in stored.keys() & data.hashes.keys() if stored[k] != data.hashes[k])
        if changed:
            raise UsageError(
                f"{run_dir / results.RESULT_FILE} was computed from other data rows ({', '.join(changed)} changed since); "
                f"the data mirror differs from the one this run used: move that run folder away to recompute it, or use another --runs-dir"
            )
        return record

    @staticmethod
    def artifact_ready(path: Path) -> bool:
        return (path / ARTIFACT_FILE).is_file()

    # -- the run ------------------------------------------------------------------------------------

    def prepare(self, spec: RunSpec) -> tuple[RunSpec, Defense, RunData, StagePlan]:
        spec, defense = resolve(spec)
        task = get_registry().get("tasks", spec.attack.task)
        data = build_run_data(spec, task, self.data_dir)
        return spec, defense, data, plan_stages(spec, defense, data)

    @staticmethod
    def check_model_settings(spec: RunSpec) -> None:
        """What needs the model's modules (from its config alone), checked before a step is taken: the LoRA targets."""
        linear = model_linear_names(spec.model)
        check_lora_targets(linear, spec.alignment.train.lora_targets, "alignment.train.lora_targets")
        if spec.finetune.regime == "fresh":  # continue trains the alignment adapter: its targets are alignment.train's
            check_lora_targets(linear, spec.finetune.lora_targets, "finetune.lora_targets")

    @staticmethod
    def check_judges_ready(spec: RunSpec) -> None:
        """Every judge can score here (packages, weights cached or reachable): a judge that would fail at
        evaluation stops the run before its first step, not after hours of training."""
        registry = get_registry()
        for name in spec.evaluation.judges:
            registry.get("judges", name)().check_ready()

    def run(self, spec: RunSpec) -> dict[str, Any]:
        """Run (or resume) one spec; return its result record. A finished run is not redone."""
        spec, defense, data, plan = self.prepare(spec)
        run_dir = self.run_dir(spec)
        existing = self.finished_result(run_dir, data)
        if existing is not None:
            return existing
        self.check_model_settings(spec)
        self.check_judges_ready(spec)
        results.writable_dir(self.runs_dir, "runs directory")
        run_id = spec.run_id()
        emit("hft_run_start", RunStart(run_id, run_dir, spec.to_dict()))
        start = time.perf_counter()
        try:
            record = self._run_stages(spec, defense, data, plan, run_dir, run_id)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            if not is_input_error(exc):  # bad input found late leaves nothing behind: fix it and rerun
                results.write_json(run_dir / results.ERROR_FILE, {"version": results.RESULT_VERSION, "status": "failed", "run_id": run_id, "spec": spec.to_dict(), "error": error, "traceback": traceback.format_exc()})
            emit("hft_run_end", RunEnd(run_id, "failed", error=error))
            raise
        record["total_seconds"] = round(time.perf_counter() - start, 2)
        results.write_json(run_dir / results.RESULT_FILE, record)
        (run_dir / results.ERROR_FILE).unlink(missing_ok=True)
        emit("hft_run_end", RunEnd(run_id, "finished", metrics=record["metrics"]))
        return record

    def _run_stages(self, spec: RunSpec, defense: Defense, data: RunData, plan: StagePlan, run_dir: Path, run_id: str) -> dict[str, Any]:
        registry = get_registry()
        task = registry.get("tasks", spec.attack.task)
        stages: dict[str, dict[str, Any]] = {}

        with self._stage(run_id, "alignment", stages) as info:
            align_dir = self.artifact_dir("alignment", plan.alignment)
            info.update(self._build_artifact(align_dir, plan.inputs["alignment"], lambda out: self._train_alignment(spec, defense, data, out)))

        with self._stage(run_id, "finetune", stages) as info:
            ft_dir = self.artifact_dir("finetune", plan.finetune)
            info.update(self._build_artifact(ft_dir, plan.inputs["finetune"], lambda out: self._train_finetune(spec, defense, data, align_dir, out)))

        with self._stage(run_id, "post_finetune", stages) as info:
            final_dir = ft_dir
            if plan.post_finetune is None:
                info.update(skipped=True, reused=False)
            else:
                final_dir = self.artifact_dir("post_finetune", plan.post_finetune)
                info.update(self._build_artifact(final_dir, {"finetune": plan.finetune}, lambda out: self._post_finetune(spec, defense, data, align_dir, ft_dir, out)))

        with self._stage(run_id, "evaluation", stages) as info:
            model, tokenizer, merged_under = final_model(spec.model, align_dir, final_dir, spec.finetune.regime)
            served = ServedModel(model, tokenizer, spec.model.name, merged_under, final_dir, extra={"model_spec": dataclasses.asdict(spec.model)})
            judges = [registry.get("judges", name)() for name in spec.evaluation.judges]
            backend = registry.get("backends", spec.evaluation.backend)()
            metrics, samples = evaluate(served, data, task, judges, backend, spec.evaluation)
            results.write_jsonl(run_dir / results.GENERATIONS_FILE, samples)
            info.update(reused=False, judges=[j.describe() for j in judges], backend=backend.name, n_harmful_prompts=len(data.hs_prompts), n_task_test=len(data.task_test))
            generated_by = backend.describe()

        return {
            "version": results.RESULT_VERSION,
            "status": "finished",
            "run_id": run_id,
            "spec": spec.to_dict(),
            "defense": {"name": defense.name, "stages": [s.value for s in defense.stages], "params": spec.defense.args},
            "metrics": metrics,
            "stages": stages,
            "adapter_regime": spec.finetune.regime,
            "data": {"hashes": data.hashes, "n_alignment": len(data.alignment), "n_harmful": len(data.harmful), "n_user": len(data.user), "n_poison": data.n_poison, "n_hs_prompts": len(data.hs_prompts), "n_task_test": len(data.task_test)},
            "artifacts": {"alignment": str(align_dir), "finetune": str(ft_dir), "final": str(final_dir)},
            "provenance": {**results.provenance(), "backend": generated_by},
        }

    @contextmanager
    def _stage(self, run_id: str, name: str, stages: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
        emit("hft_stage_start", StageStart(run_id, name))
        info: dict[str, Any] = {}
        start = time.perf_counter()
        yield info
        info["seconds"] = round(time.perf_counter() - start, 3)
        stages[name] = {"seconds": info.pop("seconds"), "reused": bool(info.pop("reused", False)), **info}
        emit("hft_stage_end", StageEnd(run_id, name, stages[name]["seconds"], stages[name]["reused"]))

    @staticmethod
    def checkpoint_dir(artifact: Path) -> Path:
        """Mid-stage checkpoints of the training stage that builds `artifact` (same key), removed once it is built."""
        return artifact.with_name(artifact.name + ".ckpt")

    def _build_artifact(self, path: Path, inputs: dict[str, Any], build) -> dict[str, Any]:
        """Reuse the artifact at `path` if its files still match the checksums recorded when it was built; else
        (re)build it into a temporary folder and rename it into place."""
        with results.file_lock(path.with_name(path.name + ".lock")):
            if self.artifact_ready(path):
                meta = self._verified_meta(path)
                if meta is not None:
                    return {"reused": True, "artifact": str(path), **meta.get("stats", {})}
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                stats = {**build(tmp), "built_on": results.machine()}  # reused later, it still says where it was built
                results.write_json(tmp / ARTIFACT_FILE, {"inputs": inputs, "stats": stats, "files": file_checksums(tmp)})
            except BaseException:  # a failed build leaves no half-written folder (mid-stage checkpoints live beside it)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            shutil.rmtree(self.checkpoint_dir(path), ignore_errors=True)
            return {"reused": False, "artifact": str(path), **stats}

    def _verified_meta(self, path: Path) -> dict[str, Any] | None:
        """The artifact's record if every file it lists is intact; None (after a one-line notice) if not, so the
        caller rebuilds it. Artifacts built before checksums were recorded are trusted as they are."""
        try:
            meta = json.loads((path / ARTIFACT_FILE).read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
            problem = f"its {ARTIFACT_FILE} is unreadable"
        elif "files" not in meta:
            return meta
        else:
            inside = lambda name: (path / name).resolve().is_relative_to(path.resolve())  # noqa: E731  (a name read from a file is not trusted as a path)
            bad = [name for name, digest in sorted(meta["files"].items()) if not inside(name) or file_sha256(path / name) != digest]
            if not bad:
                return meta
            problem = f"{bad[0]} is missing or does not match its recorded checksum"
        self.console.print(f"hft-bench: artifact {path} is damaged ({problem}); rebuilding it", highlight=False, soft_wrap=True)
        return None

    # -- stage bodies -------------------------------------------------------------------------------

    def _streams(self, spec: RunSpec, defense: Defense, data: RunData, stage: Stage, tokenizer, sources: set[str]) -> dict[str, BatchStream]:
        train_cfg = spec.alignment.train if stage is Stage.ALIGNMENT else spec.finetune
        seed = spec.seed * 1000 + (1 if stage is Stage.ALIGNMENT else 2)
        streams = {s: BatchStream(getattr(data, s), tokenizer, train_cfg, seed) for s in sorted(sources)}
        pair_streams(list(streams.values()))
        return streams

    def _train_with(self, spec: RunSpec, defense: Defense, data: RunData, stage: Stage, model, tokenizer, out: Path, attach=add_lora) -> dict[str, Any]:
        """Train the adapter `attach(model, train config)` puts on `model` through one stage, and save it to `out`."""
        train_cfg = spec.alignment.train if stage is Stage.ALIGNMENT else spec.finetune
        acts = stage in defense.stages
        primary = "alignment" if stage is Stage.ALIGNMENT else "user"
        n_steps = steps_for(len(getattr(data, primary)), train_cfg)
        schedule = defense.schedule(stage, n_steps) if acts else [primary] * n_steps
        sources = set(schedule) | (set(defense.needs) if acts else set())
        streams = self._streams(spec, defense, data, stage, tokenizer, sources)
        torch.manual_seed(spec.seed)
        model = attach(model, train_cfg)
        step_fn = defense.step if acts else Defense.step.__get__(defense)
        checkpoints = Checkpoints(self.checkpoint_dir(out.with_name(out.name.removesuffix(".tmp"))), train_cfg.checkpoint_every, defense if acts else None)
        stats = train(model, step_fn, schedule, streams, train_cfg, stage, description=f"{stage.value} ({defense.name if acts else 'sft'})", checkpoints=checkpoints)
        model.save_pretrained(out, safe_serialization=True)
        return {"resumed_from_step": stats.resumed_from_step, "steps": stats.steps, "train_seconds": round(stats.seconds, 2), "seconds_per_step": round(stats.seconds_per_step, 4), "first_loss": stats.first_loss, "last_loss": stats.last_loss, "step_metrics": stats.metrics, "rows_seen": {s: st.rows_served for s, st in streams.items()}}

    def _train_alignment(self, spec: RunSpec, defense: Defense, data: RunData, out: Path) -> dict[str, Any]:
        model, tokenizer = load_base(spec.model)
        return self._train_with(spec, defense, data, Stage.ALIGNMENT, model, tokenizer, out)

    def _train_finetune(self, spec: RunSpec, defense: Defense, data: RunData, align_dir: Path, out: Path) -> dict[str, Any]:
        model, tokenizer = load_base(spec.model)
        regime = spec.finetune.regime
        model = under_finetune(model, align_dir, regime)
        attach = lambda m, train: finetune_adapter(m, align_dir, regime, train)  # noqa: E731
        stats = self._train_with(spec, defense, data, Stage.FINETUNE, model, tokenizer, out, attach)
        state = defense.state_dict()
        if state:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / DEFENSE_STATE_FILE))
        return stats

    def _post_finetune(self, spec: RunSpec, defense: Defense, data: RunData, align_dir: Path, ft_dir: Path, out: Path) -> dict[str, Any]:
        model, tokenizer = load_base(spec.model)
        model = load_adapter(under_finetune(model, align_dir, spec.finetune.regime), ft_dir, trainable=True)
        if (ft_dir / DEFENSE_STATE_FILE).is_file():
            from safetensors.torch import load_file

            defense.load_state_dict(load_file(str(ft_dir / DEFENSE_STATE_FILE)))
        named = trainable_parameters(model)
        task = get_registry().get("tasks", spec.attack.task)
        backend = get_registry().get("backends", "hf")()

        def task_score(plain_model, rows) -> float:
            served = ServedModel(plain_model, tokenizer, spec.model.name)
            return task_accuracy(served, rows, task, backend, spec.evaluation.task_max_new_tokens or task.max_new_tokens, spec.evaluation.batch_size)[0]

        ctx = PostContext(
            model, [p for _, p in named], [n for n, _ in named], spec.seed, out, tokenizer=tokenizer,
            harmful=data.harmful, task_validation=data.task_validation,
            aligned_weights=lambda: merge_adapter(load_base(spec.model)[0], align_dir).state_dict(),
            base_weights=lambda: load_base(spec.model)[0].state_dict(),
            task_score=task_score,
            progress=lambda message: self.console.print(f"post_finetune ({defense.name}): {message}", highlight=False, soft_wrap=True),
        )
        with torch.no_grad():  # an edit that needs gradients enables them itself
            report = defense.post_finetune(ctx)
        if ctx.full_model is not None:
            save_full_weights(ctx.full_model, out)
            return {"report": report, "result": "full weights"}
        model.save_pretrained(out, safe_serialization=True)
        return {"report": report}
