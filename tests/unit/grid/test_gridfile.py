"""Grid files: parsing, errors that name the file and the known keys, expansion to run specs."""

import pytest

from harmbench_ft.cli import main
from harmbench_ft.errors import UsageError
from harmbench_ft.grid import expand, load_grid

GRID = """
preset = "tiny"
defenses = ["sft", "booster"]
ratios = [0.0, 0.1]
tasks = ["sst2"]
seeds = [0, 1, 2]
n = 12
judges = ["keyword"]

[set]
"finetune.lr" = 2e-3
alignment.n_alignment = 8
[set.evaluation]
n_task_test = 4

[defense_args.booster]
lamb = 7

[resources]
gpus = 1
"""


def write(tmp_path, text, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_grid_expands_to_the_product_with_settings_and_defense_args(tmp_path):
    grid = load_grid(write(tmp_path, GRID))
    assert grid.settings == {"finetune.lr": 2e-3, "alignment.n_alignment": 8, "evaluation.n_task_test": 4}
    assert grid.resources == {"cpus": 1.0, "gpus": 1.0}
    specs = expand(grid)
    assert len(specs) == 2 * 2 * 3
    assert {(s.defense.name, s.attack.ratio, s.seed) for s in specs} == {(d, r, s) for d in ("sft", "booster") for r in (0.0, 0.1) for s in (0, 1, 2)}
    for spec in specs:
        assert spec.preset == "tiny" and spec.attack.n == 12 and spec.attack.task == "sst2"
        assert spec.finetune.lr == 2e-3 and spec.alignment.n_alignment == 8 and spec.evaluation.n_task_test == 4
        assert spec.alignment.train.lr == 1e-3  # [set] touched only what it named
        assert spec.defense.args == ({"lamb": 7} if spec.defense.name == "booster" else {})
    assert len({s.content_hash() for s in specs}) == len(specs)


def test_model_and_n_may_be_axes(tmp_path):
    text = 'preset = "tiny"\ndefenses = ["sft"]\nratios = [0.1]\ntasks = ["sst2", "agnews"]\nseeds = [0]\nmodel = ["tiny-llama", "tiny-qwen2"]\nn = [8, 16]\n'
    specs = expand(load_grid(write(tmp_path, text)))
    assert {(s.model.name, s.attack.task, s.attack.n) for s in specs} == {(m, t, n) for m in ("tiny-llama", "tiny-qwen2") for t in ("sst2", "agnews") for n in (8, 16)}


@pytest.mark.parametrize(
    "text, expected",
    [
        ('optimizer = "sgd"\n' + GRID, ["unknown key(s) optimizer", "known keys: preset, defenses, ratios, tasks, seeds, model, n, judges, set, defense_args, resources"]),
        ('preset = "tiny"\ndefenses = ["sft"]\n', ["missing key(s) ratios, tasks, seeds"]),
        (GRID.replace("seeds = [0, 1, 2]", "seeds = []"), ["`seeds` must be a non-empty list"]),
        (GRID.replace("seeds = [0, 1, 2]", "seeds = [0, 1, 0]"), ["`seeds` lists 0 more than once"]),
        (GRID.replace('"finetune.lr" = 2e-3', '"attack.ratio" = 0.5'), ["[set] may not set attack.ratio", "ratios"]),
        (GRID.replace("[defense_args.booster]", "[defense_args.vaccine]"), ["names defense(s) vaccine", "sft, booster"]),
        (GRID.replace("gpus = 1", "tpus = 1"), ["[resources] has no key 'tpus'", "cpus, gpus"]),
        (GRID.replace('preset = "tiny"', 'preset = ["tiny"]'), ["`preset` must be one preset name"]),
        ("preset = \n", ["not valid TOML"]),
    ],
)
def test_bad_grid_files_fail_naming_the_file_and_the_choices(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as err:
        load_grid(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    for part in expected:
        assert part in message


def test_bad_settings_and_values_fail_at_expansion_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match=r"grid.toml: \[set\]: unknown setting 'finetune.lrr'.*Known settings: .*finetune.lr"):
        expand(load_grid(write(tmp_path, GRID.replace('"finetune.lr"', '"finetune.lrr"'))))
    with pytest.raises(UsageError, match=r"grid.toml: .*attack.ratio: cannot read 'high' as float"):
        expand(load_grid(write(tmp_path, GRID.replace("ratios = [0.0, 0.1]", 'ratios = [0.0, "high"]'))))


def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["grid", str(write(tmp_path, "typo = 1\n" + GRID)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hft-bench: error:") and "unknown key(s) typo" in err and len(err.splitlines()) == 1
    assert main(["grid", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["grid", str(write(tmp_path, GRID)), "--executor", "slurm", "--dry-run"]) == 2
    assert "unknown executor 'slurm'; known: local, ray" in capsys.readouterr().err
    assert main(["grid", str(write(tmp_path, GRID)), "--ray-address", "auto", "--dry-run"]) == 2
    assert "executor 'local' takes no option(s) address" in capsys.readouterr().err


@pytest.mark.parametrize(
    "axes,expected",
    [
        ('ratios = ["0.1", "1e-1"]\nseeds = [0]', "are the same run"),
        ('ratios = [0.1]\nseeds = [true]', "cannot read True as int"),
        ('ratios = [0.1]\nseeds = [0]\njudges = ["keyword", "keyword"]', "lists keyword more than once"),
    ],
)
def test_duplicated_or_mistyped_axes_are_one_line_errors(tmp_path, axes, expected):
    path = tmp_path / "grid.toml"
    path.write_text(f'preset = "tiny"\ndefenses = ["sft"]\ntasks = ["sst2"]\n{axes}\n')
    with pytest.raises(UsageError, match=expected):
        specs = expand(load_grid(path))
        from harmbench_ft.runner import resolve

        for spec in specs:
            resolve(spec)
