import dataclasses
import pytest

from harmbench_ft.errors import UsageError
from harmbench_ft.spec import LATER_FIELDS, PRESETS, apply_overrides, known_paths, preset, spec_from_dict, stable_hash, validate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hash_survives_a_json_round_trip(name):
    spec = preset(name)
    assert spec_from_dict(spec.to_dict()).content_hash() == spec.content_hash()


def test_hash_changes_with_any_setting_and_not_with_int_vs_float():
    spec = preset("tiny")
    assert apply_overrides(spec, {"finetune.lr": "2e-3"}).content_hash() != spec.content_hash()
    assert apply_overrides(spec, {"finetune.epochs": 1}).content_hash() == spec.content_hash()


def test_overrides_parse_to_field_types():
    spec = apply_overrides(preset("tiny"), {"finetune.lora_targets": "q_proj,v_proj", "finetune.bf16": "true", "finetune.max_steps": "none", "attack.n": "40"})
    assert spec.finetune.lora_targets == ["q_proj", "v_proj"]
    assert spec.finetune.bf16 is True and spec.finetune.max_steps is None and spec.attack.n == 40


def test_unknown_and_bad_settings_are_all_reported_with_the_known_ones():
    with pytest.raises(UsageError) as err:
        apply_overrides(preset("tiny"), {"finetune.lrr": 1, "attack.n": "many"})
    message = str(err.value)
    assert "finetune.lrr" in message and "attack.n" in message and "finetune.lr" in message


def test_validate_reports_every_problem():
    spec = apply_overrides(preset("tiny"), {"attack.ratio": 1.5, "finetune.batch_size": 4, "finetune.micro_batch_size": 3})
    with pytest.raises(UsageError) as err:
        validate(spec)
    assert "attack.ratio" in str(err.value) and "micro_batch_size" in str(err.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(UsageError, match="tiny, cpu, cpu-v1, paper"):
        preset("huge")


def test_known_paths_cover_nested_fields():
    paths = known_paths()
    assert "alignment.train.lr" in paths and "evaluation.judges" in paths and "seed" in paths


def test_a_task_max_new_tokens_of_none_resolves_to_the_tasks_budget():
    from harmbench_ft.runner import resolve

    budgets = {}
    for task in ("sst2", "agnews", "gsm8k"):
        spec, _ = resolve(apply_overrides(preset("cpu"), {"attack.task": task}))
        budgets[task] = spec.evaluation.task_max_new_tokens
    assert budgets == {"sst2": 4, "agnews": 8, "gsm8k": 200}
    explicit, _ = resolve(apply_overrides(preset("cpu"), {"attack.task": "gsm8k", "evaluation.task_max_new_tokens": "64"}))
    assert explicit.evaluation.task_max_new_tokens == 64
    # resolving writes the budget into the spec, so "none" and the task's number are the same run
    same, _ = resolve(apply_overrides(preset("cpu"), {"evaluation.task_max_new_tokens": "4"}))
    assert same.content_hash() == resolve(preset("cpu"))[0].content_hash()
    with pytest.raises(UsageError, match="task_max_new_tokens"):
        validate(apply_overrides(preset("cpu"), {"evaluation.task_max_new_tokens": "0"}))


@pytest.mark.parametrize("path,changed", [(("evaluation", "split"), "validation"), (("alignment", "n_benign"), 600), (("alignment", "benign_source"), "safety-tuned-llamas")])
def test_a_later_field_at_its_default_leaves_the_hash_and_old_records_as_they_were(path, changed):
    """Fields added (and a preset renamed) after results were published: stored run ids must not change."""
    spec = preset("cpu-v1")
    old_form = spec.to_dict()
    old_form["preset"] = "cpu"  # cpu-v1's records were written under the preset's old name
    for later in LATER_FIELDS:  # a record written before any later field existed
        del old_form[later[0]][later[1]]
    for train in (old_form["finetune"], old_form["alignment"]["train"]):
        del train["checkpoint_every"]  # never hashed, and added later too
    assert spec.content_hash() == stable_hash(old_form)
    assert spec_from_dict(old_form).run_id() == spec.run_id()
    other = apply_overrides(spec, {".".join(path): changed})
    assert other.content_hash() != spec.content_hash()


def test_an_unknown_evaluation_split_is_a_usage_error():
    with pytest.raises(UsageError, match="evaluation.split must be one of test, validation"):
        validate(apply_overrides(preset("tiny"), {"evaluation.split": "dev"}))


def test_a_bad_value_names_its_field_and_type_without_listing_every_setting():
    with pytest.raises(UsageError) as err:
        apply_overrides(preset("tiny"), {"finetune.lr": "fast"})
    assert "finetune.lr: cannot read 'fast' as float" in str(err.value) and "Known settings" not in str(err.value)
    with pytest.raises(UsageError, match="Known settings: .*finetune.lr"):
        apply_overrides(preset("tiny"), {"finetune.lrr": "1"})


def test_a_defense_parameter_added_later_keeps_stored_run_ids_and_is_read_back_with_its_old_value():
    """RepNoise's `variant` came after the v1 runs: at its old value it stays out of the hash, a stored spec without
    it reads as that value, and the new default (the authors' loss) is a different run."""
    import json
    from pathlib import Path

    from harmbench_ft.runner import resolve
    from harmbench_ft.spec import spec_from_dict

    path = Path(__file__).parents[2] / "leaderboards" / "results" / "repnoise-sst2-p0.1-n200-s0-a38ceb218c" / "result.json"
    record = json.loads(path.read_text())
    assert "variant" not in record["spec"]["defense"]["args"]
    stored = resolve(spec_from_dict(record["spec"]))[0]
    assert stored.defense.args["variant"] == "response-tokens" and stored.run_id() == record["run_id"]

    fresh = dataclasses.replace(stored, defense=dataclasses.replace(stored.defense, args={k: v for k, v in stored.defense.args.items() if k != "variant"}))
    fresh = resolve(fresh)[0]
    assert fresh.defense.args["variant"] == "original" and fresh.run_id() != record["run_id"]
