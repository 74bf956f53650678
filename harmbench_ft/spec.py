"""The run spec: one typed, validated description of a run, its presets and its content hash.

A spec is plain dataclasses so that it serialises to JSON as-is (it is stored in every result) and
so that every field can be overridden by a dotted path (``--set finetune.lr=1e-4``, or a grid file).
Defaults carry a comment naming their source.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

from harmbench_ft.errors import UsageError

SPEC_VERSION = 1


@dataclass
class ModelSpec:
    name: str = "smollm2-135m"  # alias, hub id or local path (see harmbench_ft.models.loading)
    revision: str | None = None
    trust_remote_code: bool = False  # never on unless the user asks


@dataclass
class TrainConfig:
    """Hyperparameters of one training stage (one LoRA adapter trained by the one training loop)."""

    epochs: float = 1.0  # passes over the stage's primary data (alignment rows, or the user's n rows)
    max_steps: int | None = None  # optional cap on optimizer steps; 0 = no training (the adapter stays zero)
    batch_size: int = 8  # rows per optimizer step
    micro_batch_size: int | None = None  # rows per forward pass; batch_size / micro_batch_size = accumulation
    lr: float = 5e-4
    weight_decay: float = 0.1  # AdamW, as in the git-disl scripts
    max_grad_norm: float = 1.0  # protocol.md: grad-clip 1.0
    max_length: int = 256  # tokens per row (prompt + response)
    lora_r: int = 32
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    bf16: bool = False  # bf16 autocast for forward/backward (weights and optimizer stay fp32)
    group_by_length: bool = False  # micro-batches of similar length (less padding); see training/batches.py
    # Optimizer steps between mid-stage checkpoints (0: none), so a killed stage resumes where it was. Never part
    # of a hash: it does not change what is computed. 10 costs well under 5% of a cpu-preset stage (docs/grids.md).
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        self.epochs = float(self.epochs)  # 2 and 2.0 must hash the same


REGIMES = ("fresh", "continue")  # protocol.md, "Adapter regime"


@dataclass
class FinetuneConfig(TrainConfig):
    """The user's fine-tuning stage: a training stage plus what it trains (protocol.md, "Adapter regime").

    ``fresh``: the alignment adapter is merged into the base and a new LoRA (this config's shape) is trained on
    top (git-disl/Booster, Vaccine and Lisa baselines). ``continue``: the alignment adapter itself is trained
    further, unmerged, so its shape is ``alignment.train``'s (``--alternating single_lora``: Booster in its repo;
    SFT, Booster and Panacea in the Panacea repo). Post-fine-tuning edits act on whichever adapter this trained.
    """

    regime: str = "fresh"


@dataclass
class AlignmentSpec:
    """The provider's safety alignment stage and the provider-side data sizes."""

    train: TrainConfig = field(default_factory=TrainConfig)
    n_alignment: int = 600  # (harmful prompt, refusal) rows
    # Benign (instruction, answer) rows aligned on beside the refusals, so the aligned model answers ordinary
    # instructions and refuses harmful ones instead of refusing everything (docs/leaderboard.md, protocol v2).
    n_benign: int = 0
    benign_source: str = "alpaca-train"
    n_harmful: int = 600  # provider harmful (prompt, harmful answer) rows, used by Booster/RepNoise/Panacea
    alignment_source: str = "safety-tuned-llamas"
    harmful_source: str = "beavertails-330k-train"


@dataclass
class AttackSpec:
    """The user's upload: n rows of a benign task, a fraction `ratio` of them harmful."""

    ratio: float = 0.1  # poison ratio p
    n: int = 1000  # sample number
    task: str = "sst2"
    harmful_source: str = "beavertails-330k-train"


@dataclass
class EvalSpec:
    harmful_prompts: str = "beavertails-330k-test"  # prompt set of the harmful score
    # "test" (the published protocol) or "validation", for tuning a defense's hyperparameters without
    # touching test data: HS prompts from the provider's harmful source (the unique unsafe prompts right
    # after the provider harmful window, disjoint from every other window) and FA rows from the end of the
    # task's shuffled train split (never uploaded). See harmbench_ft.data.windows.
    split: str = "test"
    n_harmful_prompts: int = 100  # unique prompts
    n_task_test: int = 200  # rows of the task's test set; 0: the protocol's (Task.test_size: SST2 all 872, AGNews/GSM8K first 1000)
    max_new_tokens: int = 64  # for harmful prompts
    task_max_new_tokens: int | None = 8  # None: the task's own answer budget (Task.max_new_tokens)
    judges: list[str] = field(default_factory=lambda: ["keyword"])
    backend: str = "hf"
    batch_size: int = 16


@dataclass
class DefenseSpec:
    name: str = "sft"
    args: dict[str, Any] = field(default_factory=dict)  # resolved with the defense's defaults by the runner


@dataclass
class RunSpec:
    preset: str = "cpu"
    model: ModelSpec = field(default_factory=ModelSpec)
    defense: DefenseSpec = field(default_factory=DefenseSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    alignment: AlignmentSpec = field(default_factory=AlignmentSpec)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """A stable hash of everything that determines the result."""
        return stable_hash(hash_view(self.to_dict()))

    def run_id(self) -> str:
        p = f"{self.attack.ratio:g}"
        return f"{self.defense.name}-{self.attack.task}-p{p}-n{self.attack.n}-s{self.seed}-{self.content_hash()[:10]}"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Fields added after results were published, with their defaults. A stored spec without one meant the
# default; the content hash leaves such a field out while it holds its default, so stored run ids (and
# protocol ids) stay valid and a grid does not redo finished runs.
LATER_FIELDS: dict[tuple[str, ...], Any] = {
    ("evaluation", "split"): "test",
    ("alignment", "n_benign"): 0,
    ("alignment", "benign_source"): "alpaca-train",
    ("finetune", "regime"): "fresh",
}


def _later_field_slots(spec: dict[str, Any], create: bool) -> Iterator[tuple[dict[str, Any], str, Any]]:
    """(parent dict, key, default) of every later field in `spec`; missing parents are made or skipped."""
    for path, default in LATER_FIELDS.items():
        node: dict[str, Any] | None = spec
        for key in path[:-1]:
            node = node.setdefault(key, {}) if create else node.get(key)
            if node is None:
                break
        if node is not None:
            yield node, path[-1], default


def params_added_later(defense: str) -> dict[str, Any]:
    """A defense's parameters added after results were published, with the values their old records meant."""
    from harmbench_ft.plugins import get_registry  # here, not at import: the registry loads the plugins

    try:
        return dict(get_registry().get("defenses", defense).params_added_later)
    except (UsageError, AttributeError):
        return {}


def hashed_args(defense: str, args: dict[str, Any]) -> dict[str, Any]:
    """A defense's arguments as they enter run ids and artifact keys: without a later parameter at its old value."""
    later = params_added_later(defense)
    return {k: v for k, v in args.items() if not (k in later and v == later[k])}


def with_later_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored spec (or part of one with the same nesting) with missing later fields filled in."""
    spec = copy.deepcopy(spec)
    for node, key, default in _later_field_slots(spec, create=True):
        node.setdefault(key, default)
    defense = spec.get("defense")
    if isinstance(defense, dict) and isinstance(defense.get("args"), dict) and defense["args"]:
        for key, value in params_added_later(defense.get("name", "")).items():
            defense["args"].setdefault(key, value)
    return spec


# Presets renamed after results were published: a spec hashes under the name its records were written with,
# so `--preset cpu-v1` finds (and does not redo) the runs recorded as preset "cpu" before protocol v2.
HASHED_PRESET_NAMES = {"cpu-v1": "cpu"}


# Presets kept only so their records stay valid, with the line a leaderboard prints above their tables.
SUPERSEDED_PRESETS = {
    "cpu-v1": "Protocol cpu-v1, superseded by the cpu preset's protocol v2 (2026-12-02): careful annotation showed its "
    "benign fine-tune already removes most of the alignment, so poison adds little and HS differences between defenses "
    "say little about them (docs/leaderboard.md).",
}


def preset_of(spec: dict[str, Any]) -> str:
    """The preset a stored spec belongs to under today's names: records written as "cpu" before protocol v2 (no
    benign alignment rows) are cpu-v1's."""
    if spec.get("preset") == "cpu" and not with_later_defaults(spec)["alignment"].get("n_benign"):
        return "cpu-v1"
    return spec.get("preset", "cpu")


UNHASHED_TRAIN_FIELDS = ("checkpoint_every",)  # TrainConfig fields that never change a result


# The fine-tuning stage's later fields (finetune.regime), which also key the fine-tune artifact.
LATER_TRAIN_FIELDS = {path[1]: default for path, default in LATER_FIELDS.items() if path[0] == "finetune"}


def train_key(train: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig (as a dict) as it enters hashes: without the fields that never change a result, and without a
    later fine-tuning field at its default (finetune.regime "fresh"), so stored artifact keys hold."""
    return {k: v for k, v in train.items() if k not in UNHASHED_TRAIN_FIELDS and not (k in LATER_TRAIN_FIELDS and v == LATER_TRAIN_FIELDS[k])}


def hash_view(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as hashed: later fields dropped while they hold their default, renamed presets by their old name,
    no field that never changes a result."""
    spec = copy.deepcopy(spec)
    if isinstance(spec.get("finetune"), dict):
        spec["finetune"] = train_key(spec["finetune"])
    if isinstance(spec.get("alignment", {}).get("train"), dict):
        spec["alignment"]["train"] = train_key(spec["alignment"]["train"])
    if spec.get("preset") in HASHED_PRESET_NAMES:
        spec["preset"] = HASHED_PRESET_NAMES[spec["preset"]]
    for node, key, default in _later_field_slots(spec, create=False):
        if key in node and node[key] == default:
            del node[key]
    defense = spec.get("defense")
    if isinstance(defense, dict) and isinstance(defense.get("args"), dict):
        defense["args"] = hashed_args(defense.get("name", ""), defense["args"])
    return spec


# -------------------------------------------------------------------------------------------------
# Presets
# -------------------------------------------------------------------------------------------------

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny() -> RunSpec:
    """A tiny random Llama built in-process and a few real rows: the whole pipeline in seconds."""
    train = TrainConfig(epochs=1, batch_size=4, lr=1e-3, max_length=192, lora_r=4, lora_alpha=8, lora_targets=list(ALL_PROJ))
    return RunSpec(
        preset="tiny",
        model=ModelSpec(name="tiny-llama"),
        attack=AttackSpec(ratio=0.1, n=20),
        alignment=AlignmentSpec(train=copy.deepcopy(train), n_alignment=16, n_harmful=16),
        finetune=FinetuneConfig(**dataclasses.asdict(train)),
        evaluation=EvalSpec(n_harmful_prompts=8, n_task_test=8, max_new_tokens=8, task_max_new_tokens=4, batch_size=8),
    )


# pair-clf: fit to careful annotation of this benchmark's own answers (held-out κ in docs/evaluation.md); the two
# unvalidated judges the v1 tables were headed by stay beside it for comparison.
CPU_JUDGES = ["pair-clf", "keyword+harm-clf", "keyword"]
V1_JUDGES = ["keyword+harm-clf", "keyword"]  # what cpu-v1's records were judged by when run (pair-clf was added by re-judging)
FT_N, FT_EPOCHS, FT_LR = 200, 2, 2e-4  # cpu-v1's attack size and fine-tuning schedule (docs/leaderboard.md)


def _cpu_v1() -> RunSpec:
    """Protocol v1 of the cpu preset (the `cpu` preset until 2026-12-02; its records say preset "cpu").

    Kept so its records, run ids and tables stay valid and re-render. Careful annotation showed its benign SST2
    fine-tune already removes most of the alignment (docs/leaderboard.md), so it is not the published protocol.

    Measured on a 2-core CPU (docs/leaderboard.md has the numbers and how each setting was chosen):
    - fp32, not bf16: a training step of 8 x 120 tokens took 4.5 s in fp32 and 7.2 s under bf16 autocast.
    - Alignment groups rows by length (less padding; its rows are all refusals, so nothing is reweighted).
      Fine-tuning does not: the loss is normalised by response tokens, so grouping the long poison rows
      into a few batches would cut their share of the updates and change the attack.
    - Alignment: 600 refusals, LoRA r=32 scale 1 on all 7 projections, lr 5e-4, batch 8, one epoch.
    - Fine-tuning: a fresh LoRA of the same shape, lr FT_LR, FT_EPOCHS epochs over n=FT_N rows.
    - Evaluation: 200 unique BeaverTails test prompts, all 872 SST2 validation rows, judges keyword+harm-clf and
      keyword as run (unvalidated; `hft-bench rejudge --judge pair-clf` adds the validated judge to stored runs).
    """
    return RunSpec(
        preset="cpu-v1",
        model=ModelSpec(name="smollm2-135m"),
        attack=AttackSpec(ratio=0.1, n=FT_N),
        alignment=AlignmentSpec(
            train=TrainConfig(epochs=1, batch_size=8, lr=5e-4, max_length=256, lora_r=32, lora_alpha=32, lora_targets=list(ALL_PROJ), group_by_length=True),
            n_alignment=600,
            n_harmful=600,
        ),
        finetune=FinetuneConfig(epochs=FT_EPOCHS, batch_size=8, lr=FT_LR, max_length=192, lora_r=32, lora_alpha=32, lora_targets=list(ALL_PROJ)),
        evaluation=EvalSpec(n_harmful_prompts=200, n_task_test=0, max_new_tokens=48, task_max_new_tokens=None, judges=V1_JUDGES, batch_size=16),
    )


N_BENIGN_ALIGNMENT = 600  # protocol v2: benign Alpaca rows aligned on beside the 600 refusals (docs/leaderboard.md)
V2_FT_EPOCHS, V2_FT_LR = 5, 3e-4  # protocol v2: 125 fine-tuning steps; at v1's 2 epochs and 2e-4 the poison barely moved the sturdier alignment


def _cpu() -> RunSpec:
    """Protocol v2: SmolLM2-135M-Instruct on real data, chosen with pair-clf and checked against careful annotation (docs/leaderboard.md).

    v1 aligned on refusals only, so the aligned model refused everything and any benign fine-tune had to undo
    refusing in general: annotated, its SST2 fine-tune at p=0 was already ~27% harmful. v2 aligns on the same
    600 refusals plus N_BENIGN_ALIGNMENT benign Alpaca rows (150 steps): the aligned model answers ordinary
    instructions and refuses harmful ones, a benign fine-tune keeps the refusals and poison breaks them.
    Everything else is v1's (measured there): fp32, length-grouped alignment batches, LoRA r=32 scale 1 on all 7
    projections, a fresh LoRA of the same shape for the fine-tune over n=FT_N rows, 200 unique BeaverTails test
    prompts (48 new tokens), all 872 SST2 validation rows, judges CPU_JUDGES — except the fine-tune's schedule:
    V2_FT_EPOCHS epochs (125 steps) at lr V2_FT_LR, chosen on the validation split, since at v1's 2 epochs and
    lr 2e-4 the poison barely moved the sturdier alignment.
    """
    spec = _cpu_v1()
    spec.preset = "cpu"
    spec.alignment.n_benign = N_BENIGN_ALIGNMENT
    spec.finetune.epochs, spec.finetune.lr = float(V2_FT_EPOCHS), V2_FT_LR
    spec.evaluation.judges = list(CPU_JUDGES)
    return spec


def _paper() -> RunSpec:
    """Llama-2-7B with the Booster paper's protocol (protocol.md; git-disl/Booster scripts), for GPU users."""
    lora = dict(lora_r=32, lora_alpha=4, lora_targets=["q_proj", "k_proj", "v_proj"])  # git-disl train.py
    return RunSpec(
        preset="paper",
        model=ModelSpec(name="meta-llama/Llama-2-7b-hf"),
        attack=AttackSpec(ratio=0.1, n=1000),  # Booster Table 1: n=1000, p=0.1
        alignment=AlignmentSpec(
            # script/alignment/smooth_align.sh: 20 epochs, batch 10, lr 5e-4, wd 0.1, constant schedule
            train=TrainConfig(epochs=20, batch_size=10, lr=5e-4, weight_decay=0.1, max_length=512, bf16=True, **lora),
            n_alignment=5000,  # sample_num=5000
            n_harmful=5000,  # bad_sample_num=5000
            harmful_source="beavertails-30k-train",
        ),
        # script/finetune/sft_poison_ratio.sh: 20 epochs, batch 10, lr 1e-5, wd 0.1
        finetune=FinetuneConfig(epochs=20, batch_size=10, lr=1e-5, weight_decay=0.1, max_length=512, bf16=True, **lora),
        evaluation=EvalSpec(
            harmful_prompts="beavertails-30k-test",
            n_harmful_prompts=1000,  # Booster: first 1000 unsafe 30k_test prompts
            n_task_test=872,  # SST2 validation, all of it
            max_new_tokens=512,  # protocol.md section 4
            task_max_new_tokens=200,
            judges=["beaver-dam"],
            batch_size=32,
        ),
    )


PRESETS = {"tiny": _tiny, "cpu": _cpu, "cpu-v1": _cpu_v1, "paper": _paper}


def preset(name: str) -> RunSpec:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# -------------------------------------------------------------------------------------------------
# Overrides: dotted paths, values parsed to the field's type; unknown keys list the known ones.
# -------------------------------------------------------------------------------------------------


def known_paths(obj: Any = None, prefix: str = "") -> list[str]:
    obj = obj if obj is not None else RunSpec()
    paths = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            paths += known_paths(value, f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


def _field_type(owner: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(owner))
    return hints[name]


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def parse_value(raw: Any, typ: Any, path: str) -> Any:
    """Turn a CLI string (or a TOML value) into the field's type, with an error naming the path."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        return parse_value(raw, args[0], path)
    if origin is list:
        (item,) = typing.get_args(typ)
        items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
        return [parse_value(x, item, path) for x in items]
    if origin is dict:
        if isinstance(raw, dict):
            return dict(raw)
        raise UsageError(f"{path}: expected a table of key=value pairs, got {raw!r}")
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        if typ in (int, float) and isinstance(raw, bool):  # TOML `true` is not the number 1
            raise ValueError
        value = typ(raw)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{path}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}") from None
    if typ is int and not INT64_MIN <= value <= INT64_MAX:  # torch (seeds, sizes) takes 64-bit integers only
        raise UsageError(f"{path}: {value} is outside the 64-bit integer range [{INT64_MIN}, {INT64_MAX}]")
    return value


def apply_overrides(spec: RunSpec, overrides: dict[str, Any]) -> RunSpec:
    """Set dotted-path fields; every unknown path and bad value is reported at once."""
    spec = copy.deepcopy(spec)
    problems = []
    for path, raw in overrides.items():
        owner, *_ = (spec,)
        parts = path.split(".")
        try:
            for part in parts[:-1]:
                owner = getattr(owner, part)
                if not dataclasses.is_dataclass(owner):
                    raise AttributeError
            if not dataclasses.is_dataclass(owner) or parts[-1] not in {f.name for f in dataclasses.fields(owner)}:
                raise AttributeError
        except AttributeError:
            problems.append(f"unknown setting {path!r}")
            continue
        if dataclasses.is_dataclass(getattr(owner, parts[-1])):  # a whole section would reset to built-in defaults
            leaves = [f"{path}.{f.name}" for f in dataclasses.fields(getattr(owner, parts[-1]))][:3]
            problems.append(f"{path!r} is a section, not a setting; set its fields, e.g. {', '.join(leaves)}")
            continue
        try:
            setattr(owner, parts[-1], parse_value(raw, _field_type(owner, parts[-1]), path))
        except UsageError as exc:
            problems.append(str(exc))
    if problems:  # the list of every setting helps only when a name was wrong
        unknown = any(p.startswith("unknown setting") for p in problems)
        raise UsageError("; ".join(problems) + (f". Known settings: {', '.join(known_paths())}" if unknown else ""))
    return spec


EVAL_SPLITS = ("test", "validation")


def validate(spec: RunSpec) -> None:
    """Check ranges; report every problem at once."""
    problems = []
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not INT64_MIN <= spec.seed <= INT64_MAX:
        problems.append(f"seed must be an integer in the 64-bit range [{INT64_MIN}, {INT64_MAX}], got {spec.seed!r}")
    if not 0.0 <= spec.attack.ratio <= 1.0:
        problems.append(f"attack.ratio must be in [0, 1], got {spec.attack.ratio}")
    if spec.attack.n < 1:
        problems.append(f"attack.n must be >= 1, got {spec.attack.n}")
    elif spec.attack.ratio > 0 and round(spec.attack.ratio * spec.attack.n) == 0:
        problems.append(f"attack.ratio={spec.attack.ratio:g} with attack.n={spec.attack.n} gives no poison row (round(p*n) = 0); raise n or p")
    elif spec.attack.ratio < 1 and round(spec.attack.ratio * spec.attack.n) == spec.attack.n:
        problems.append(f"attack.ratio={spec.attack.ratio:g} with attack.n={spec.attack.n} gives no benign row; raise n or use ratio 1")
    if spec.finetune.regime not in REGIMES:
        problems.append(f"finetune.regime must be one of {', '.join(REGIMES)}, got {spec.finetune.regime!r}")
    for name, train in (("alignment.train", spec.alignment.train), ("finetune", spec.finetune)):
        if train.batch_size < 1:
            problems.append(f"{name}.batch_size must be >= 1")
        micro = train.micro_batch_size or train.batch_size
        if micro < 1 or train.batch_size % micro:
            problems.append(f"{name}.micro_batch_size ({micro}) must divide batch_size ({train.batch_size})")
        if train.lr <= 0:
            problems.append(f"{name}.lr must be > 0")
        if train.epochs <= 0 and train.max_steps is None:
            problems.append(f"{name}.epochs must be > 0")
        if train.max_steps is not None and train.max_steps < 0:
            problems.append(f"{name}.max_steps must be >= 0 (0: no steps, the stage's adapter stays zero)")
        if train.max_length < 16:
            problems.append(f"{name}.max_length must be >= 16")
        if train.checkpoint_every < 0:
            problems.append(f"{name}.checkpoint_every must be >= 0 (0: no mid-stage checkpoints)")
        if train.lora_r < 1 or not train.lora_targets:
            problems.append(f"{name}: LoRA needs lora_r >= 1 and at least one target module")
    if spec.alignment.n_alignment < 1:
        problems.append("alignment.n_alignment must be >= 1")
    if spec.alignment.n_benign < 0:
        problems.append("alignment.n_benign must be >= 0")
    if spec.evaluation.task_max_new_tokens is not None and spec.evaluation.task_max_new_tokens < 1:
        problems.append("evaluation.task_max_new_tokens must be >= 1, or none for the task's own budget")
    if spec.evaluation.n_harmful_prompts < 1:
        problems.append("evaluation.n_harmful_prompts must be >= 1")
    if not spec.evaluation.judges:
        problems.append("evaluation.judges must name at least one judge")
    elif len(set(spec.evaluation.judges)) != len(spec.evaluation.judges):
        problems.append(f"evaluation.judges names a judge twice: {spec.evaluation.judges}")
    if spec.evaluation.split not in EVAL_SPLITS:
        problems.append(f"evaluation.split must be one of {', '.join(EVAL_SPLITS)}, got {spec.evaluation.split!r}")
    if problems:
        raise UsageError("invalid run spec: " + "; ".join(problems))


def spec_from_dict(data: dict[str, Any]) -> RunSpec:
    """Rebuild a RunSpec from its JSON form (as stored in result.json)."""
    data = with_later_defaults(data)  # a field missing from an old record meant its default, not the preset's value
    base = preset(data.get("preset", "cpu"))
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k != "args":
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(data, "")
    return apply_overrides(base, flat)
