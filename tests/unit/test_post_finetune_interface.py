"""What a post-fine-tuning edit can read (aligned and base weights, the provider's harmful rows, held-out task rows
with the task scorer) and return (the adapter, as random perturbation and Panacea do, or full weights), through the
public API, as a third party would write it."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from harmbench_ft import Defense, Stage, hookimpl, plugins
from harmbench_ft.runner import Runner
from harmbench_ft.spec import apply_overrides, preset

SEEN: dict = {}


@dataclass
class Params:
    share: float = 1.0  # how far each full weight moves back toward its aligned value

    def validate(self):
        pass


class BackToAligned(Defense):
    """A full-weight edit: W ← W_f + share · (W_a − W_f) on every decoder matrix."""

    name = "test-back-to-aligned"
    stages = (Stage.POST_FINETUNE,)
    post_needs = ("harmful", "task_validation")
    Params = Params

    def post_finetune(self, ctx):
        aligned, base = ctx.aligned_weights(), ctx.base_weights()
        model = ctx.merged_model()
        before = ctx.task_score(model, ctx.task_validation[:8])
        moved = 0
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(self.params.share * (aligned[name] - p))
                moved += p.numel()
        ctx.keep_full_weights(model)
        SEEN.update(harmful=len(ctx.harmful), validation=len(ctx.task_validation), base_differs=any(not torch.equal(aligned[k], base[k]) for k in base))
        return {"moved": moved, "score_before": before, "score_after": ctx.task_score(model, ctx.task_validation[:8])}


class Plugin:
    @hookimpl
    def hft_register_defenses(self, register):
        register(BackToAligned)


@pytest.fixture
def registered():
    plugins.register_plugin(Plugin(), name="test-back-to-aligned")
    yield
    plugins.unregister_plugin("test-back-to-aligned")


def tiny_spec(**overrides):
    return apply_overrides(preset("tiny"), {"attack.ratio": 0.1, **overrides})


def answers(run_dir):
    return [json.loads(line)["response"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]


def test_a_full_weight_edit_is_saved_served_and_reused(tmp_path, shared_data, registered):
    runner = Runner(tmp_path, shared_data)
    record = runner.run(tiny_spec(**{"defense.name": "test-back-to-aligned"}))
    post = record["stages"]["post_finetune"]
    assert post["result"] == "full weights" and post["report"]["moved"] > 0
    assert 0 <= post["report"]["score_before"] <= 100
    # what the edit could read: the provider's harmful window, 256 held-out task rows, base weights unlike the aligned
    assert SEEN["harmful"] == 16 and SEEN["validation"] == 256 and SEEN["base_differs"]
    final = tmp_path / "artifacts" / "post_finetune" / record["artifacts"]["final"].rsplit("/", 1)[1]
    assert (final / "model.safetensors").is_file() and not (final / "adapter_model.safetensors").exists()

    # share=1 puts every decoder matrix back to its aligned value: the model served answers as the aligned one does
    aligned = runner.run(tiny_spec(**{"finetune.max_steps": 0}))
    assert answers(tmp_path / record["run_id"]) == answers(tmp_path / aligned["run_id"])
    sft = runner.run(tiny_spec())
    assert answers(tmp_path / sft["run_id"]) != answers(tmp_path / aligned["run_id"])  # the check above has teeth

    weights = load_file(str(final / "model.safetensors"))
    assert any(".layers." in k for k in weights)
    again = runner.run(tiny_spec(**{"defense.name": "test-back-to-aligned"}))
    assert again == record  # a finished run is reused, not redone


def test_an_edit_reading_data_is_keyed_by_it_and_the_other_edits_keys_are_unchanged(tmp_path, shared_data, registered):
    from harmbench_ft.runner import plan_stages

    runner = Runner(tmp_path, shared_data)
    spec, defense, data, plan = runner.prepare(tiny_spec(**{"defense.name": "test-back-to-aligned"}))
    data.hashes["task_validation"] = "other rows"
    assert plan_stages(spec, defense, data).post_finetune != plan.post_finetune
    spec, defense, data, plan = runner.prepare(tiny_spec(**{"defense.name": "random-perturbation"}))
    data.hashes["task_validation"] = data.hashes["harmful"] = "other rows"
    assert plan_stages(spec, defense, data).post_finetune == plan.post_finetune


@pytest.mark.parametrize("defense", ["restoration", "antidote", "safelora"])
def test_the_built_in_post_fine_tuning_defenses_run_on_the_tiny_preset_reusing_sfts_fine_tune(tmp_path, shared_data, defense, capsys):
    runner = Runner(tmp_path, shared_data)
    sft = runner.run(tiny_spec())
    record = runner.run(tiny_spec(**{"defense.name": defense}))
    assert record["stages"]["finetune"]["reused"] is True and record["artifacts"]["finetune"] == sft["artifacts"]["finetune"]
    post = record["stages"]["post_finetune"]
    assert post["reused"] is False and post["report"] and 0 <= record["metrics"]["harmful_score"] <= 100
    assert (post.get("result") == "full weights") == (defense == "restoration")
    if defense != "safelora":  # the long edits say what they are doing
        assert f"post_finetune ({defense}): " in capsys.readouterr().err
