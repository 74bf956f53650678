"""The command line: one-line errors with exit code 2, clean --json on stdout."""

import json
import subprocess
import sys

import pytest

from harmbench_ft.cli import main


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--defense", "nope", "--preset", "tiny"], "unknown defense 'nope'"),
        (["run", "--attack", "ratio", "--preset", "tiny"], "expected key=value"),
        (["run", "--attack", "rate=0.1", "--preset", "tiny"], "unknown key 'rate'"),
        (["run", "--set", "finetune.lrr=1", "--preset", "tiny"], "unknown setting 'finetune.lrr'"),
        (["run", "--preset", "huge"], "unknown preset"),
        (["run", "--attack", "ratio=2", "--preset", "tiny"], "attack.ratio must be in [0, 1]"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(argv, needle, capsys, tmp_path):
    assert main(argv + ["--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("hft-bench: error:") and "Traceback" not in err


def test_missing_data_is_a_usage_error(tmp_path, capsys):
    assert main(["run", "--preset", "tiny", "--data-dir", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path)]) == 2
    assert "not found at" in capsys.readouterr().err


def test_run_json_prints_only_the_result_on_stdout(tmp_path, shared_data):
    proc = subprocess.run(
        [sys.executable, "-m", "harmbench_ft.cli", "run", "--defense", "sft", "--attack", "ratio=0.1", "--preset", "tiny", "--data-dir", str(shared_data), "--runs-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["status"] == "finished" and (tmp_path / record["run_id"] / "result.json").is_file()


def test_leaderboard_from_results(tmp_path, shared_data):
    from harmbench_ft.runner import Runner
    from harmbench_ft.spec import apply_overrides, preset

    runner = Runner(tmp_path / "runs", shared_data)
    for ratio in (0.0, 0.2):
        runner.run(apply_overrides(preset("tiny"), {"attack.ratio": ratio}))
    assert main(["leaderboard", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    md = next((tmp_path / "lb").glob("tiny-*.md")).read_text()
    assert "| sft |" in md and "HS p=0" in md and "FA p=0.2" in md and "keyword" in md
    csv = next((tmp_path / "lb").glob("tiny-*.csv")).read_text().splitlines()
    assert csv[0].startswith("defense,ratio,HS_mean") and len(csv) == 4  # p=0, p=0.2 and their average


def test_the_run_summary_shows_every_judges_hs(capsys):
    from harmbench_ft.cli import print_result

    record = {
        "run_id": "r",
        "spec": {"defense": {"name": "sft"}, "attack": {"task": "sst2", "ratio": 0.1, "n": 200}, "model": {"name": "smollm2-135m"}},
        "metrics": {"harmful_score": 30.0, "harmful_score_plus": 31.0, "harmful_score/keyword": 49.0, "harmful_score_plus/keyword": 50.5, "finetune_accuracy": 85.2},
        "stages": {"evaluation": {"seconds": 1.0, "judges": [{"id": "keyword+harm-clf"}, {"id": "keyword"}]}},
        "artifacts": {"final": "/runs/artifacts/finetune/k"},
    }
    print_result(record)
    out = capsys.readouterr().out
    assert "judge keyword+harm-clf" in out and "30.0" in out
    assert "HS, judge keyword (HS+)" in out and "49.0 (50.5)" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--set", "finetune=1"], "'finetune' is a section, not a setting"),
        (["--set", "alignment.train=1"], "'alignment.train' is a section"),
        (["--attack", "ratio=0.1,ratio=0.2"], "'ratio' given twice"),
        (["--attack", "ratio=0.1,p=0.2"], "'p' sets attack.ratio"),
        (["--defense-arg", "rho=1", "--defense-arg", "rho=2"], "--defense-arg: 'rho' given twice"),
        (["--set", "finetune.lr=1e-4", "--set", "finetune.lr=2e-4"], "--set: 'finetune.lr' given twice"),
        (["--attack", "ratio=0.1,n=1"], "gives no poison row"),
        (["--attack", "ratio=0.99,n=10"], "gives no benign row"),
    ],
)
def test_conflicting_or_meaningless_inputs_are_one_line_errors(tmp_path, capsys, argv, message):
    from harmbench_ft.cli import main

    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_judge_named_twice_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--judge", "keyword", "--judge", "keyword"]) == 2
    assert "names a judge twice" in capsys.readouterr().err


def test_a_missing_local_model_folder_is_named(tmp_path, capsys):
    assert main(["run", "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "no such local folder" in err and "Repo id" not in err


def test_a_list_setting_takes_comma_separated_items_in_one_set_flag():
    import argparse

    from harmbench_ft.cli import build_spec

    args = argparse.Namespace(
        preset="tiny", defense="sft", model=None, trust_remote_code=False, attack=["ratio=0.1"], task=None, seed=None, judge=None, backend=None,
        set=["evaluation.judges=keyword+harm-clf,keyword,finetune.lr=1e-3", "alignment.train.lora_targets=q_proj,v_proj"], defense_arg=None,
    )
    spec = build_spec(args)
    assert spec.evaluation.judges == ["keyword+harm-clf", "keyword"] and spec.finetune.lr == 1e-3
    assert spec.alignment.train.lora_targets == ["q_proj", "v_proj"]
