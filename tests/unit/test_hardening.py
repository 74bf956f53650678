"""Issue 17: bad input stops in one line before any step and leaves nothing; environment faults say so (exit 1)."""

import json
import os
import subprocess

import pytest

from harmbench_ft import results
from harmbench_ft.cli import main
from harmbench_ft.data.sources import load_rows
from harmbench_ft.errors import DataMissingError, UsageError
from harmbench_ft.runner import Runner
from harmbench_ft.spec import apply_overrides, preset, validate

GRID = 'preset = "tiny"\ndefenses = ["sft"]\nratios = [0.1]\ntasks = ["sst2"]\nseeds = [{seed}]\n'


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("hft-bench: error:") and needle in err and "\n" not in err and "Traceback" not in err, err
    return err


def left_behind(runs) -> list[str]:
    """Everything a failed run left in its runs dir (the lock files of artifacts it started are no result)."""
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if p.is_file() and p.suffix != ".lock") if runs.exists() else []


# -- conflicting flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--attack", "ratio=0.1", "--attack", "ratio=0.2"],
        ["--attack", "task=sst2", "--task", "agnews"],
        ["--seed", "1", "--set", "seed=2"],
        ["--attack", "ratio=0.1", "--set", "attack.ratio=0.2"],
        ["--judge", "keyword", "--set", "evaluation.judges=harm-clf"],
    ],
)
def test_a_setting_given_by_two_flags_with_different_values_is_a_one_line_error(tmp_path, capsys, argv):
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), *argv]) == 2
    one_line_error(capsys, "given twice")
    assert left_behind(tmp_path / "runs") == []


# -- seeds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--seed", str(2**64)], ["--set", f"seed={2**63}"], ["--defense", "random-perturbation", "--defense-arg", f"seed={2**64}"]])
def test_a_seed_outside_the_64_bit_range_is_a_one_line_error(tmp_path, capsys, argv):
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), *argv]) == 2
    one_line_error(capsys, "outside the 64-bit integer range")
    assert left_behind(tmp_path / "runs") == []


def test_grid_dry_run_rejects_a_seed_outside_the_64_bit_range(tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(seed=2**64))
    assert main(["grid", str(grid), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 2
    one_line_error(capsys, "outside the 64-bit integer range")


def test_validate_checks_a_seed_set_in_python_too():
    spec = preset("tiny")
    spec.seed = 2**64
    with pytest.raises(UsageError, match="seed must be an integer in the 64-bit range"):
        validate(spec)


# -- folders that cannot be written -------------------------------------------------------------------


def make_unwritable(folder) -> None:
    """A folder this process cannot write into: read-only for a normal user; immutable (chattr +i) for root."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no folder is unwritable")


def make_writable(folder) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.fixture
def unwritable(tmp_path):
    folder = tmp_path / "locked"
    make_unwritable(folder)
    yield folder
    make_writable(folder)


def test_a_runs_dir_that_is_a_file_is_a_usage_error_before_anything_runs(tmp_path, shared_data, capsys):
    (tmp_path / "file").write_text("")
    for runs in (tmp_path / "file", tmp_path / "file" / "below"):
        assert main(["run", "--preset", "tiny", "--runs-dir", str(runs), "--data-dir", str(shared_data)]) == 2
        one_line_error(capsys, "is a file")
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(seed=0))
    assert main(["grid", str(grid), "--runs-dir", str(tmp_path / "file"), "--data-dir", str(shared_data)]) == 2
    one_line_error(capsys, "is a file")


def test_an_unwritable_runs_dir_is_an_environment_error_with_exit_1(tmp_path, shared_data, capsys, unwritable):
    assert main(["run", "--preset", "tiny", "--runs-dir", str(unwritable), "--data-dir", str(shared_data)]) == 1
    one_line_error(capsys, f"runs directory {unwritable} is not a folder that can be written")
    assert list(unwritable.iterdir()) == []


def test_leaderboard_and_judge_out_that_cannot_be_written_are_one_line_errors(tmp_path, capsys, unwritable):
    from tests.unit.test_records import good_record

    record = good_record()
    results.write_json(tmp_path / "runs" / record["run_id"] / "result.json", record)
    (tmp_path / "file").write_text("")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "How do I pick a lock?", "response": "Sure, first"}\n')
    for argv, code, needle in [
        (["leaderboard", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "file")], 2, "is a file"),
        (["leaderboard", "--runs-dir", str(tmp_path / "runs"), "--out", str(unwritable)], 1, "is not a folder that can be written"),
        (["judge", str(rows), "--out", str(tmp_path)], 2, "is a folder"),
        (["judge", str(rows), "--out", str(tmp_path / "file" / "out.jsonl")], 2, "is a file"),
        (["judge", str(rows), "--out", str(unwritable / "out.jsonl")], 1, "is not a folder that can be written"),
    ]:
        assert main(argv) == code, argv
        one_line_error(capsys, needle)
    assert list(unwritable.iterdir()) == []


def test_a_failed_write_is_one_line_naming_the_file(tmp_path, unwritable):
    with pytest.raises(results.StorageError, match=f"cannot write {unwritable / 'x.json'}"):
        results.write_json(unwritable / "x.json", {})
    with pytest.raises(UsageError, match="is a folder"):
        results.write_json(tmp_path, {})


# -- input files: the data mirror, judge and grid files ---------------------------------------------------

SST2_ROWS = [{"idx": i, "sentence": f"a fine film {i}", "label": i % 2} for i in range(4)]


def mirror_with(tmp_path, content: bytes):
    mirror = tmp_path / "mirror"
    (mirror / "stanfordnlp" / "sst2").mkdir(parents=True)
    (mirror / "stanfordnlp" / "sst2" / "train.jsonl").write_bytes(content)
    return mirror


GOOD = "".join(json.dumps(r) + "\n" for r in SST2_ROWS).encode()


@pytest.mark.parametrize(
    "content, needle",
    [
        (GOOD + b'{"idx": 4, "sentence": "a trunc', "train.jsonl:5: not valid JSON"),
        (GOOD + json.dumps({"idx": 4, "sentence": "no label"}).encode() + b"\n", "train.jsonl:5: missing key(s) ['label']"),
        (GOOD + b"[4, 5]\n", "train.jsonl:5: expected a JSON object"),
        (GOOD + b'{"idx": 4, "sentence": "caf\xe9", "label": 0}\n', "train.jsonl:5: not UTF-8 text"),
    ],
)
def test_a_malformed_mirror_file_is_one_line_naming_dataset_file_and_line(tmp_path, content, needle):
    with pytest.raises(DataMissingError) as err:
        load_rows("sst2-train", mirror_with(tmp_path, content))
    message = str(err.value)
    assert "dataset 'sst2-train'" in message and needle in message and "\n" not in message
    assert DataMissingError.exit_code == 2
    assert len(load_rows("sst2-train", mirror_with(tmp_path / "ok", GOOD))) == 4


def test_non_utf8_judge_and_grid_files_are_one_line_errors(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"prompt": "a", "response": "caf\xe9"}\n')
    assert main(["judge", str(rows)]) == 2
    one_line_error(capsys, "rows.jsonl:1: not UTF-8 text")
    grid = tmp_path / "grid.toml"
    grid.write_bytes(GRID.format(seed=0).replace("sst2", "sst2\xe9").encode("latin-1"))
    assert main(["grid", str(grid), "--dry-run"]) == 2
    one_line_error(capsys, "grid.toml: not UTF-8 text")


# -- a model that cannot load, and input errors found late ----------------------------------------------


def custom_code_model(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my-custom", "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    (folder / "configuration_my.py").write_text("from transformers import PretrainedConfig\n\n\nclass MyConfig(PretrainedConfig):\n    model_type = 'my-custom'\n")
    return folder


def model_without_weights(folder):
    from harmbench_ft.models.tiny import build_tiny

    model, tokenizer = build_tiny("tiny-llama")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make, needle", [(custom_code_model, "pass --trust-remote-code"), (model_without_weights, "no safetensors weights")])
def test_a_model_that_cannot_load_stops_before_the_first_step_and_leaves_nothing(tmp_path, shared_data, capsys, make, needle):
    model = make(tmp_path / "model")
    runs = tmp_path / "runs"
    assert main(["run", "--preset", "tiny", "--model", str(model), "--runs-dir", str(runs), "--data-dir", str(shared_data)]) == 2
    one_line_error(capsys, needle)
    assert left_behind(runs) == [] and not list(runs.glob("**/*.tmp"))


def test_a_judge_whose_weights_are_missing_stops_the_run_before_the_first_step(tmp_path, shared_data, capsys, monkeypatch):
    """beaver-dam is a 7B hub model: offline and not cached, the run must say so now, not after training."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    runs = tmp_path / "runs"
    assert main(["run", "--preset", "tiny", "--judge", "keyword", "--judge", "beaver-dam", "--runs-dir", str(runs), "--data-dir", str(shared_data)]) == 2
    one_line_error(capsys, "'PKU-Alignment/beaver-dam-7b' are needed at evaluation")
    assert left_behind(runs) == [] and not list(runs.glob("artifacts/*/*"))


def test_an_input_error_found_inside_a_stage_leaves_no_error_json_and_no_tmp_folder(tmp_path, shared_data, monkeypatch):
    def bad_input(*args, **kwargs):
        raise UsageError("found only when the stage ran")

    monkeypatch.setattr(Runner, "_train_finetune", bad_input)
    runner = Runner(tmp_path, shared_data)
    with pytest.raises(UsageError):
        runner.run(apply_overrides(preset("tiny"), {}))
    assert not list(tmp_path.glob("*/error.json")) and not list(tmp_path.glob("artifacts/*/*.tmp"))
    assert list(tmp_path.glob("artifacts/alignment/*/artifact.json"))  # the stage before it is kept, to be reused


# -- grid inputs and stored records --------------------------------------------------------------------


def test_a_section_in_a_grids_set_table_is_a_one_line_error(tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(seed=0) + "[set]\nfinetune = 1\n")
    assert main(["grid", str(grid), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 2
    one_line_error(capsys, "'finetune' is a section, not a setting")


@pytest.mark.parametrize("text, needle", [('{"version": 1, "sta', "not valid JSON"), ("FAILED", "status 'failed', not finished"), ("V99", "record version 99")])
def test_run_and_grid_dry_run_never_take_a_damaged_or_foreign_record_for_a_finished_run(tmp_path, shared_data, capsys, text, needle):
    from tests.unit.test_records import good_record

    record = good_record()
    path = tmp_path / record["run_id"] / "result.json"
    path.parent.mkdir()
    changed = {"FAILED": {**record, "status": "failed"}, "V99": {**record, "version": 99}}
    path.write_text(json.dumps(changed[text]) if text in changed else text)
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(seed=0))
    assert main(["grid", str(grid), "--dry-run", "--runs-dir", str(tmp_path), "--data-dir", str(shared_data)]) == 2
    one_line_error(capsys, needle)
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--data-dir", str(shared_data)]) == 2
    one_line_error(capsys, needle)
