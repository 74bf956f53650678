"""The adapter regime (`finetune.regime`): fresh merges the alignment and trains a new LoRA, continue trains the
alignment adapter itself; a recorded axis that leaves every fresh run id as it was."""

import json

import pytest
import torch
from safetensors.torch import load_file

from harmbench_ft import UsageError
from harmbench_ft.leaderboard import protocol_id
from harmbench_ft.runner import Runner, resolve
from harmbench_ft.spec import apply_overrides, preset, spec_from_dict

ADAPTER = "adapter_model.safetensors"


def tiny_spec(**overrides):
    # a fine-tune LoRA shape unlike the alignment's (r=4), so the regime shows in the adapter itself
    return apply_overrides(preset("tiny"), {"finetune.lora_r": 2, "finetune.lora_alpha": 4, **overrides})


def adapter(path):
    return load_file(str(path / ADAPTER))


def test_fresh_is_the_default_and_keeps_the_run_id_it_had_before_the_field():
    spec = resolve(tiny_spec())[0]
    assert spec.finetune.regime == "fresh"
    stored = spec.to_dict()
    del stored["finetune"]["regime"]  # a record written before the field existed
    assert resolve(spec_from_dict(stored))[0].run_id() == spec.run_id()
    cont = resolve(tiny_spec(**{"finetune.regime": "continue"}))[0]
    assert cont.run_id() != spec.run_id()
    assert protocol_id(cont.to_dict()) != protocol_id(spec.to_dict())  # separate tables
    assert protocol_id(stored) == protocol_id(spec.to_dict())


def test_an_unknown_regime_is_one_clear_usage_error():
    with pytest.raises(UsageError, match="finetune.regime must be one of fresh, continue, got 'contine'"):
        resolve(tiny_spec(**{"finetune.regime": "contine"}))


def test_continue_trains_the_alignment_adapter_and_fresh_a_new_one(tmp_path, shared_data):
    runner = Runner(tmp_path, shared_data)
    fresh = runner.run(tiny_spec())
    cont = runner.run(tiny_spec(**{"finetune.regime": "continue"}))
    assert fresh["adapter_regime"] == "fresh" and cont["adapter_regime"] == "continue"
    assert cont["spec"]["finetune"]["regime"] == "continue"
    assert cont["stages"]["alignment"]["reused"] is True  # the alignment does not depend on the regime
    assert cont["artifacts"]["finetune"] != fresh["artifacts"]["finetune"]

    aligned = adapter(tmp_path / "artifacts" / "alignment" / cont["artifacts"]["alignment"].rsplit("/", 1)[1])
    continued = adapter(tmp_path / "artifacts" / "finetune" / cont["artifacts"]["finetune"].rsplit("/", 1)[1])
    new = adapter(tmp_path / "artifacts" / "finetune" / fresh["artifacts"]["finetune"].rsplit("/", 1)[1])
    # continue: the alignment adapter's own tensors (its r=4 shape), moved by the fine-tune
    assert continued.keys() == aligned.keys() and all(continued[k].shape == aligned[k].shape for k in aligned)
    assert any(not torch.equal(continued[k], aligned[k]) for k in aligned)
    # fresh: a new LoRA of the fine-tune's r=2 shape
    assert {v.shape for k, v in new.items() if "lora_A" in k} != {v.shape for k, v in aligned.items() if "lora_A" in k}
    assert cont["metrics"] != fresh["metrics"] or cont["stages"]["finetune"]["last_loss"] != fresh["stages"]["finetune"]["last_loss"]


def test_with_no_fine_tune_steps_both_regimes_evaluate_the_aligned_model(tmp_path, shared_data):
    """max_steps=0: a fresh LoRA starts at zero and a continued one at the alignment adapter, so both serve exactly
    the aligned model: the same answers. A regime that forgot the alignment (or merged it twice) would not."""
    runner = Runner(tmp_path, shared_data)
    answers = {}
    for regime in ("fresh", "continue"):
        record = runner.run(tiny_spec(**{"finetune.regime": regime, "finetune.max_steps": 0}))
        lines = (tmp_path / record["run_id"] / "generations.jsonl").read_text().splitlines()
        answers[regime] = [json.loads(line)["response"] for line in lines]
    assert answers["fresh"] == answers["continue"]
    base = runner.run(tiny_spec(**{"finetune.max_steps": 0, "alignment.train.max_steps": 0}))
    base_answers = [json.loads(line)["response"] for line in (tmp_path / base["run_id"] / "generations.jsonl").read_text().splitlines()]
    assert base_answers != answers["fresh"]  # the alignment changed the answers, so the check above has teeth


@pytest.mark.parametrize("defense", ["lisa", "panacea", "random-perturbation"])
def test_fine_tuning_and_post_fine_tuning_defenses_run_on_the_continued_adapter(tmp_path, shared_data, defense):
    record = Runner(tmp_path, shared_data).run(tiny_spec(**{"finetune.regime": "continue", "defense.name": defense}))
    assert record["status"] == "finished" and record["adapter_regime"] == "continue"
    if defense != "lisa":
        final = adapter(tmp_path / "artifacts" / "post_finetune" / record["artifacts"]["final"].rsplit("/", 1)[1])
        tuned = adapter(tmp_path / "artifacts" / "finetune" / record["artifacts"]["finetune"].rsplit("/", 1)[1])
        assert final.keys() == tuned.keys() and any(not torch.equal(final[k], tuned[k]) for k in tuned)
