"""Mid-stage checkpoints: a training stage stopped at any step and run again ends bit-identical to one never stopped."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harmbench_ft.runner import Runner
from harmbench_ft.spec import apply_overrides, preset
from harmbench_ft.training.batches import BatchStream

REPO = Path(__file__).resolve().parents[2]
EVERY = 3  # optimizer steps between checkpoints


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def spec_for(defense: str):
    # 12 alignment and 10 fine-tuning steps (Lisa's 2 + 3 blocks make it 18), a checkpoint every 3
    overrides = {"defense.name": defense, "alignment.train.epochs": 3, "finetune.epochs": 2, "alignment.train.checkpoint_every": EVERY, "finetune.checkpoint_every": EVERY}
    spec = apply_overrides(preset("tiny"), overrides)
    spec.defense.args = {"k_align": 2, "k_ft": 3} if defense == "lisa" else {}
    return spec


def adapters(runs_dir: Path) -> dict[str, bytes]:
    files = sorted((runs_dir / "artifacts").glob("*/*/adapter_model.safetensors"))
    return {f"{f.parent.parent.name}/{f.parent.name}": f.read_bytes() for f in files}


def killed_then_resumed(runs_dir: Path, shared_data: Path, spec, kill_at_draw: int, monkeypatch) -> dict:
    """Run until the kill_at_draw-th draw of a batch from any stream, 'kill', then run again."""
    draws = {"n": 0}
    original = BatchStream.next_step

    def counting(self):
        draws["n"] += 1
        if draws["n"] == kill_at_draw:
            raise Killed
        return original(self)

    monkeypatch.setattr(BatchStream, "next_step", counting)
    with pytest.raises(Killed):
        Runner(runs_dir, shared_data).run(spec)
    monkeypatch.setattr(BatchStream, "next_step", original)
    return Runner(runs_dir, shared_data).run(spec)


_CLEAN: dict[str, tuple[dict, dict[str, bytes]]] = {}


class _Uninterrupted:
    def __init__(self, factory, shared_data):
        self.factory, self.shared_data = factory, shared_data

    def __getitem__(self, defense: str) -> tuple[dict, dict[str, bytes]]:
        if defense not in _CLEAN:  # computed once per test session
            runs = self.factory.mktemp(f"clean-{defense}")
            _CLEAN[defense] = (Runner(runs, self.shared_data).run(spec_for(defense)), adapters(runs))
        return _CLEAN[defense]


@pytest.fixture
def uninterrupted(tmp_path_factory, shared_data):
    """Each defense's run without a kill, and its adapters."""
    return _Uninterrupted(tmp_path_factory, shared_data)


# Booster draws 2 batches per alignment step (alignment and harmful), so its kills land mid-step too.
KILLS = {defense: random.Random(defense).sample(range(2, limit), 3) for defense, limit in (("sft", 22), ("lisa", 30), ("booster", 34))}


@pytest.mark.parametrize("defense,kill_at", [(d, k) for d, ks in KILLS.items() for k in ks])
def test_a_stage_killed_at_a_random_step_resumes_from_its_checkpoint_bit_identical(tmp_path, shared_data, monkeypatch, uninterrupted, defense, kill_at):
    clean_record, clean_adapters = uninterrupted[defense]
    record = killed_then_resumed(tmp_path, shared_data, spec_for(defense), kill_at, monkeypatch)
    assert adapters(tmp_path) == clean_adapters  # every stage's adapter, byte for byte
    assert record["metrics"] == clean_record["metrics"]
    resumed = {stage: info.get("resumed_from_step", 0) for stage, info in record["stages"].items() if "steps" in info and not info["reused"]}
    assert all(step % EVERY == 0 for step in resumed.values())
    if defense == "sft":  # one draw per step: 12 alignment steps, then 10 fine-tuning steps
        stage, draw = ("alignment", kill_at) if kill_at <= 12 else ("finetune", kill_at - 12)
        assert resumed[stage] == (draw - 1) // EVERY * EVERY
    assert not list((tmp_path / "artifacts").glob("*/*.ckpt"))  # checkpoints go once the artifact is built


def test_without_checkpoints_a_killed_stage_starts_over_and_still_matches(tmp_path, shared_data, monkeypatch, uninterrupted):
    spec = apply_overrides(spec_for("sft"), {"alignment.train.checkpoint_every": 0, "finetune.checkpoint_every": 0})
    assert spec.run_id() == spec_for("sft").run_id()  # checkpointing is not part of what a run computes
    record = killed_then_resumed(tmp_path, shared_data, spec, 8, monkeypatch)
    assert record["stages"]["alignment"]["resumed_from_step"] == 0
    assert adapters(tmp_path) == uninterrupted["sft"][1]


def test_a_damaged_checkpoint_is_ignored_with_a_notice_and_the_stage_starts_over(tmp_path, shared_data, monkeypatch, uninterrupted, capsys):
    spec = spec_for("sft")
    with pytest.raises(Killed):
        draws = {"n": 0}
        original = BatchStream.next_step

        def counting(self):
            draws["n"] += 1
            if draws["n"] == 8:
                raise Killed
            return original(self)

        monkeypatch.setattr(BatchStream, "next_step", counting)
        Runner(tmp_path, shared_data).run(spec)
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "artifacts").glob("alignment/*.ckpt/checkpoint.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    record = Runner(tmp_path, shared_data).run(spec)
    assert "ignoring unreadable checkpoint" in capsys.readouterr().err
    assert record["stages"]["alignment"]["resumed_from_step"] == 0 and adapters(tmp_path) == uninterrupted["sft"][1]


def test_kill_9_mid_stage_then_rerun_gives_the_same_adapters(tmp_path, shared_data, uninterrupted):
    """A real SIGKILL of the CLI once a checkpoint exists; the rerun resumes from it."""
    args = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--data-dir", str(shared_data), "--set", "alignment.train.epochs=3,finetune.epochs=2",
            "--set", f"alignment.train.checkpoint_every={EVERY},finetune.checkpoint_every={EVERY}"]
    cmd = [sys.executable, "-c", "import sys; from harmbench_ft.cli import main; sys.exit(main(sys.argv[1:]))", "run", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("artifacts/alignment/*.ckpt/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before a checkpoint was seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(tmp_path.glob("*/result.json"))
    record = Runner(tmp_path, shared_data).run(spec_for("sft"))
    assert record["stages"]["alignment"]["resumed_from_step"] > 0
    assert adapters(tmp_path) == uninterrupted["sft"][1]
