"""The staged runner on the tiny preset with real rows: complete results, shared artifacts, resume."""

import json
import sys
from pathlib import Path

import pytest

from harmbench_ft import plugins
from harmbench_ft.runner import Runner
from harmbench_ft.spec import apply_overrides, preset
from tests.conftest import fake_distribution

REPO = Path(__file__).resolve().parents[2]


def tiny_spec(**overrides):
    return apply_overrides(preset("tiny"), overrides)


def test_result_is_complete(tmp_path, shared_data):
    record = Runner(tmp_path, shared_data).run(tiny_spec())
    assert record["version"] == 1 and record["status"] == "finished"
    assert set(record["stages"]) == {"alignment", "finetune", "post_finetune", "evaluation"}
    assert all({"seconds", "reused"} <= set(info) for info in record["stages"].values())
    for metric in ("harmful_score", "harmful_score_plus", "finetune_accuracy"):
        assert 0.0 <= record["metrics"][metric] <= 100.0
    assert record["spec"]["defense"]["name"] == "sft" and record["adapter_regime"]
    assert record["provenance"]["libraries"]["torch"]
    assert record["provenance"]["backend"] == {"name": "hf"}  # what generated the answers (vllm adds its engine settings)
    machine = record["provenance"]["machine"]  # where it ran: floats differ in their last bits across instruction sets
    assert machine["cpu"] and machine["cpu_capability"] in {"DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256"} and machine["threads"] >= 1
    assert all(record["stages"][s]["built_on"] == machine for s in ("alignment", "finetune"))
    assert record["data"]["n_poison"] == 2 and record["data"]["n_user"] == 20  # round(0.1 * 20)
    run_dir = tmp_path / record["run_id"]
    assert json.loads((run_dir / "result.json").read_text()) == record
    samples = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert sum(s["kind"] == "harmful" for s in samples) == 8 and sum(s["kind"] == "task" for s in samples) == 8
    assert all("keyword" in s["judges"] for s in samples if s["kind"] == "harmful")


def test_alignment_is_shared_across_attacks_and_a_finished_run_is_not_redone(tmp_path, shared_data):
    runner = Runner(tmp_path, shared_data)
    first = runner.run(tiny_spec(**{"attack.ratio": 0.1}))
    second = runner.run(tiny_spec(**{"attack.ratio": 0.2}))
    assert second["stages"]["alignment"]["reused"] is True
    assert second["stages"]["alignment"]["built_on"] == first["stages"]["alignment"]["built_on"]  # read back from the artifact
    assert second["stages"]["finetune"]["reused"] is False
    assert second["artifacts"]["alignment"] == first["artifacts"]["alignment"]
    assert runner.run(tiny_spec(**{"attack.ratio": 0.1})) == first


def test_a_failed_run_leaves_no_result_and_resumes_at_its_stage(tmp_path, shared_data, monkeypatch):
    runner = Runner(tmp_path, shared_data)
    spec = tiny_spec()

    def crash(*args, **kwargs):
        raise RuntimeError("killed during fine-tuning")

    monkeypatch.setattr(Runner, "_train_finetune", crash)
    with pytest.raises(RuntimeError):
        runner.run(spec)
    run_dir = runner.run_dir(runner.prepare(spec)[0])
    assert not (run_dir / "result.json").exists()
    assert json.loads((run_dir / "error.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    record = runner.run(spec)
    assert record["stages"]["alignment"]["reused"] is True and record["stages"]["finetune"]["reused"] is False
    assert not (run_dir / "error.json").exists()


def test_unfinished_artifact_folder_is_never_reused(tmp_path, shared_data):
    runner = Runner(tmp_path, shared_data)
    spec, defense, data, plan = runner.prepare(tiny_spec())
    half = runner.artifact_dir("alignment", plan.alignment)
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"truncated")
    record = runner.run(spec)
    assert record["stages"]["alignment"]["reused"] is False


def test_seed_changes_the_run_and_reproduces_it(tmp_path, shared_data):
    a = Runner(tmp_path / "a", shared_data).run(tiny_spec(seed=1))
    b = Runner(tmp_path / "b", shared_data).run(tiny_spec(seed=1))
    assert a["run_id"] == b["run_id"] and a["metrics"] == b["metrics"]
    assert a["stages"]["finetune"]["last_loss"] == b["stages"]["finetune"]["last_loss"]


def test_third_party_defense_runs_through_its_entry_point(tmp_path, shared_data, monkeypatch):
    example = REPO / "examples" / "hft-bench-example-defense"
    site = tmp_path / "site"
    fake_distribution(site, "hft-bench-example-defense", "[hft_bench]\nexample-l2-anchor = hft_bench_example_defense\n")
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.syspath_prepend(str(site))
    try:
        plugins.load_plugins(rescan=True)
        record = Runner(tmp_path / "runs", shared_data).run(tiny_spec(**{"defense.name": "example-l2-anchor"}))
        assert record["defense"] == {"name": "example-l2-anchor", "stages": ["finetune"], "params": {"mu": 0.1}}
        assert record["stages"]["finetune"]["steps"] == 5
    finally:
        for path in (str(site), str(example)):
            if path in sys.path:
                sys.path.remove(path)
        plugins.pm.unregister(name="example-l2-anchor")
        plugins.load_plugins(rescan=True)


def test_zero_finetune_steps_evaluate_the_aligned_model(tmp_path, shared_data):
    from safetensors.torch import load_file

    record = Runner(tmp_path, shared_data).run(tiny_spec(**{"finetune.max_steps": "0"}))
    assert record["stages"]["finetune"]["steps"] == 0 and record["stages"]["alignment"]["steps"] > 0
    adapter = load_file(str(Path(record["artifacts"]["finetune"]) / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(bool((t == 0).all()) for t in lora_b)  # nothing merged on top of the alignment


def test_adapters_load_from_safetensors_only(tmp_path):
    import torch

    from harmbench_ft.errors import UsageError
    from harmbench_ft.models.loading import load_adapter
    from harmbench_ft.models.tiny import build_tiny

    model, _ = build_tiny("tiny-llama")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    torch.save({}, folder / "adapter_model.bin")  # a pickle: never loaded
    with pytest.raises(UsageError, match="adapters are loaded from safetensors only"):
        load_adapter(model, folder)


def test_a_finished_result_computed_from_other_data_rows_is_an_error_not_a_reuse(tmp_path, shared_data):
    from harmbench_ft import results as results_module
    from harmbench_ft.errors import UsageError

    runner = Runner(tmp_path, shared_data)
    record = runner.run(tiny_spec())
    path = tmp_path / record["run_id"] / "result.json"
    record["data"]["hashes"]["user"] = "0" * 64  # as if the mirror's task rows had changed since
    results_module.write_json(path, record)
    with pytest.raises(UsageError, match="computed from other data rows \\(user changed since\\)"):
        runner.run(tiny_spec())
    from harmbench_ft.cli import main

    grid = tmp_path / "grid.toml"
    grid.write_text('preset = "tiny"\ndefenses = ["sft"]\nratios = [0.1]\ntasks = ["sst2"]\nseeds = [0]\n')
    assert main(["grid", str(grid), "--dry-run", "--runs-dir", str(tmp_path), "--data-dir", str(shared_data)]) == 2  # not "done"


def test_a_damaged_artifact_is_rebuilt_with_a_notice_and_the_run_is_unchanged(tmp_path, shared_data, capsys):
    """Issue 17 #5: every artifact file's sha256 is recorded when it is built and checked on reuse; a file corrupted
    behind an intact header, or truncated, is rebuilt (one line on stderr), never reused."""
    import shutil

    first = Runner(tmp_path / "a", shared_data).run(tiny_spec(**{"attack.ratio": 0.1}))
    align = Path(first["artifacts"]["alignment"])
    meta = json.loads((align / "artifact.json").read_text())
    assert meta["files"]["adapter_model.safetensors"] and "artifact.json" not in meta["files"]
    weights = align / "adapter_model.safetensors"
    original = weights.read_bytes()

    for damage in ("flip", "truncate"):
        data = bytearray(original)
        if damage == "flip":
            data[-3] ^= 0xFF  # a tensor byte: the safetensors header still parses
        else:
            data = data[: len(data) // 2]
        weights.write_bytes(bytes(data))
        shutil.rmtree(tmp_path / "a" / first["run_id"])  # so the run is redone and reaches its artifacts
        again = Runner(tmp_path / "a", shared_data).run(tiny_spec(**{"attack.ratio": 0.1}))
        assert "is damaged" in capsys.readouterr().err
        assert weights.read_bytes() == original  # rebuilt, byte-identical
        assert again["stages"]["alignment"]["reused"] is False and again["metrics"] == first["metrics"]


def test_an_artifact_record_naming_a_file_outside_its_folder_is_not_trusted(tmp_path, shared_data, capsys):
    first = Runner(tmp_path, shared_data).run(tiny_spec())
    align = Path(first["artifacts"]["alignment"])
    meta = json.loads((align / "artifact.json").read_text())
    meta["files"]["../../outside"] = "0" * 64
    (align / "artifact.json").write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(tmp_path / first["run_id"])
    Runner(tmp_path, shared_data).run(tiny_spec())
    assert "is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["finetune.lora_targets", "alignment.train.lora_targets"])
def test_an_unknown_lora_target_stops_the_run_before_any_step_and_leaves_nothing(tmp_path, shared_data, path):
    from harmbench_ft import UsageError

    runner = Runner(tmp_path, shared_data)
    with pytest.raises(UsageError, match=rf"{path}: 'qq_proj' names no linear layer"):
        runner.run(tiny_spec(**{path: ["q_proj", "qq_proj"]}))
    assert not (tmp_path / "artifacts").exists()  # nothing trained: no artifact, no .tmp
    assert not list(tmp_path.glob("*/error.json"))
