"""Data windows: disjoint by prompt, exact counts, and an alignment set independent of the attack."""

import pytest

from harmbench_ft.data.sources import load_rows
from harmbench_ft.data.windows import build_run_data
from harmbench_ft.errors import DataMissingError
from harmbench_ft.plugins import get_registry
from harmbench_ft.spec import apply_overrides, preset


def data_for(shared_data, **overrides):
    spec = apply_overrides(preset("tiny"), {"attack.n": 1000, "alignment.n_alignment": 300, "alignment.n_harmful": 300, "evaluation.n_harmful_prompts": 200, **overrides})
    return build_run_data(spec, get_registry().get("tasks", spec.attack.task), shared_data)


@pytest.mark.parametrize("ratio, expected", [(0.1, 100), (0.05, 50), (0.0, 0), (0.15, 150)])
def test_exactly_round_p_n_harmful_rows(shared_data, ratio, expected):
    data = data_for(shared_data, **{"attack.ratio": ratio})
    assert data.n_poison == expected and len(data.user) == 1000
    poison_keys = {e.key for e in data.user[1000 - expected :]}
    harmful_prompts = {e.key for e in data.harmful}
    assert len(poison_keys) == expected and not poison_keys & harmful_prompts


def test_windows_are_disjoint_by_prompt(shared_data):
    data = data_for(shared_data, **{"attack.ratio": 0.2})
    windows = {
        "alignment": {e.key for e in data.alignment},
        "harmful": {e.key for e in data.harmful},
        "poison": {e.key for e in data.user[len(data.user) - data.n_poison :]},
        "hs": {e.key for e in data.hs_prompts},
    }
    names = list(windows)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not windows[a] & windows[b], f"{a} and {b} share prompts"
    assert len(windows["hs"]) == 200  # unique prompts


def test_alignment_and_provider_sets_do_not_move_with_the_attack(shared_data):
    a = data_for(shared_data, **{"attack.ratio": 0.05})
    b = data_for(shared_data, **{"attack.ratio": 0.2, "attack.n": 500})
    assert a.hashes["alignment"] == b.hashes["alignment"] and a.hashes["harmful"] == b.hashes["harmful"]
    assert a.hashes["user"] != b.hashes["user"]


def test_harmful_refusals_pair_the_harmful_prompts(shared_data):
    data = data_for(shared_data)
    assert [e.instruction for e in data.harmful_refusals] == [e.instruction for e in data.harmful]
    assert all(s.output != h.output for s, h in zip(data.harmful_refusals, data.harmful))


def test_missing_mirror_file_says_which_dataset_where_and_how_to_fix(tmp_path):
    with pytest.raises(DataMissingError) as err:
        load_rows("sst2-train", tmp_path)
    message = str(err.value)
    assert "sst2-train" in message and str(tmp_path / "stanfordnlp" / "sst2" / "train.jsonl") in message and "--data-dir" in message


@pytest.mark.parametrize("task, expected", [("sst2", 872), ("agnews", 1000), ("gsm8k", 1000)])
def test_n_task_test_zero_takes_the_protocols_test_rows(shared_data, task, expected):
    """protocol.md: SST2 all 872 validation rows; AG News and GSM8K the first 1000 test rows."""
    assert len(data_for(shared_data, **{"attack.task": task, "evaluation.n_task_test": 0}).task_test) == expected
    assert len(data_for(shared_data, **{"attack.task": task, "evaluation.n_task_test": 7}).task_test) == 7


def test_the_validation_split_evaluates_on_held_out_training_data_and_trains_on_the_same_windows(shared_data):
    """Tuning never sees a test prompt or a test row, and reuses the test run's training artifacts."""
    test = data_for(shared_data, **{"attack.ratio": 0.2, "evaluation.n_task_test": 0})
    val = data_for(shared_data, **{"attack.ratio": 0.2, "evaluation.n_task_test": 0, "evaluation.split": "validation"})
    for window in ("alignment", "harmful", "harmful_refusals", "user"):
        assert val.hashes[window] == test.hashes[window], window
    hs_val = {e.key for e in val.hs_prompts}
    assert len(hs_val) == 200
    for name, keys in {
        "test prompts": {e.key for e in test.hs_prompts},
        "alignment": {e.key for e in val.alignment},
        "harmful": {e.key for e in val.harmful},
        "poison": {e.key for e in val.user[len(val.user) - val.n_poison :]},
    }.items():
        assert not hs_val & keys, f"validation prompts overlap {name}"
    assert len(val.task_test) == 872  # as many rows as the SST2 test, taken from the train split
    train_sentences = {row["sentence"] for row in load_rows("sst2-train", shared_data)}
    assert all(row["sentence"] in train_sentences for _, row in val.task_test)
    uploaded = {e.input for e in val.user[: len(val.user) - val.n_poison]}
    assert not {e.input for e, _ in val.task_test} & uploaded
    assert {e.input for e, _ in val.task_test} != {e.input for e, _ in test.task_test}


def test_too_few_task_test_rows_is_an_error_naming_split_and_counts(shared_data):
    from harmbench_ft.errors import UsageError

    with pytest.raises(UsageError, match=r"sst2-validation: the fine-tune accuracy needs 5000 rows but the split has 872"):
        data_for(shared_data, **{"evaluation.n_task_test": 5000})


def test_benign_alignment_rows_follow_the_refusals_and_share_no_prompt_with_any_window(shared_data):
    data = data_for(shared_data, **{"alignment.n_benign": 50, "attack.ratio": 0.1})
    refusals, benign = data.alignment[:300], data.alignment[300:]
    assert len(benign) == 50 and len({e.key for e in benign}) == 50
    assert refusals == data_for(shared_data, **{"attack.ratio": 0.1}).alignment  # the refusals are unchanged
    others = {e.key for e in refusals + data.harmful + data.user + data.hs_prompts}
    assert not {e.key for e in benign} & others
    alpaca = {(r["instruction"], r["output"]) for r in load_rows("alpaca-train", shared_data)}
    assert all((e.instruction, e.output) in alpaca for e in benign)


def test_benign_alignment_rows_do_not_move_with_the_attack(shared_data):
    a = data_for(shared_data, **{"alignment.n_benign": 20, "attack.ratio": 0.0, "attack.n": 100})
    b = data_for(shared_data, **{"alignment.n_benign": 20, "attack.ratio": 0.2, "attack.n": 400})
    assert a.alignment == b.alignment and a.hashes["alignment"] == b.hashes["alignment"]


def test_benign_alignment_from_the_tasks_own_split_cannot_overlap_the_upload(shared_data):
    from harmbench_ft.errors import UsageError

    with pytest.raises(UsageError, match="together need more rows"):
        data_for(shared_data, **{"attack.task": "alpaca", "alignment.n_benign": 900, "attack.n": 200, "attack.ratio": 0.0})
    with pytest.raises(UsageError, match="no instruction/output columns"):
        data_for(shared_data, **{"alignment.benign_source": "sst2-train", "alignment.n_benign": 5})


def test_an_empty_task_test_split_is_an_error_not_a_nan_accuracy(shared_data, tmp_path):
    """An empty split once finished with FA NaN (a non-standard JSON literal); now it is one line naming the split."""
    from harmbench_ft.errors import DataMissingError, UsageError

    mirror = tmp_path / "mirror"
    for src in (p for p in shared_data.rglob("*") if p.is_file()):
        dst = mirror / src.relative_to(shared_data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
    empty = mirror / "stanfordnlp" / "sst2" / "validation.jsonl"
    empty.unlink()
    empty.write_text("")
    with pytest.raises((UsageError, DataMissingError), match=r"^sst2-validation: the test split is empty$"):
        data_for(mirror)
