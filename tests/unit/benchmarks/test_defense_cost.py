"""The cost benchmark still runs (on a tiny model); its numbers are measured with the real one."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "defense_cost.py"


def test_defense_cost_benchmark_reports_every_defense(shared_data, capsys):
    spec = importlib.util.spec_from_file_location("defense_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--model", "tiny-llama", "--repeats", "1", "--batch-size", "2", "--max-length", "64", "--data-dir", str(shared_data)])
    by_name = {r["defense"] for r in rows}
    assert by_name == {"sft", "booster", "vaccine", "repnoise", "lisa", "panacea", "random-perturbation"}
    assert all(r["time_ratio"] > 0 for r in rows if r["s_per_step"] is not None and r["defense"] != "sft")
    assert "booster" in capsys.readouterr().out


def test_repnoise_terms_benchmark_times_every_term(shared_data, capsys):
    path = BENCH.with_name("repnoise_terms.py")
    spec = importlib.util.spec_from_file_location("repnoise_terms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seconds = module.main(["--model", "tiny-llama", "--repeats", "1", "--batch-size", "2", "--max-length", "64", "--data-dir", str(shared_data)])
    assert set(seconds) == {"sft", "harmful", "lens", "mmd", "step"} and all(s > 0 for s in seconds.values())
    assert "compare with step" in capsys.readouterr().out
