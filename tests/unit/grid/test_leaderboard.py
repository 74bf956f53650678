"""Leaderboards from result records: one file set per protocol, mean ± std over seeds, cost, CSV twin, PNG."""

import io
import json

import pandas as pd
import pytest

from harmbench_ft import results
from harmbench_ft.leaderboard import write_leaderboards
from harmbench_ft.spec import apply_overrides, preset

# (defense, ratio) -> HS per seed 0 and 1; FA = 100 - HS / 2
HS = {("sft", 0.0): (10.0, 20.0), ("sft", 0.2): (60.0, 70.0), ("booster", 0.0): (4.0, 6.0), ("booster", 0.2): (20.0, 30.0)}
SECONDS_PER_STEP = {"sft": (0.5, 0.25), "booster": (1.5, 0.5)}  # alignment, fine-tuning


def record(defense, ratio, seed, hs, task="sst2", args=None):
    spec = apply_overrides(preset("tiny"), {"defense.name": defense, "attack.ratio": ratio, "seed": seed, "attack.task": task})
    spec.defense.args = args or ({"lamb": 5.0} if defense == "booster" else {})
    align, ft = SECONDS_PER_STEP[defense]
    return {
        "version": 1, "status": "finished", "run_id": spec.run_id(), "spec": spec.to_dict(),
        "metrics": {"harmful_score": hs, "harmful_score_plus": hs + 1, "finetune_accuracy": 100 - hs / 2},
        "stages": {
            "alignment": {"seconds": 1, "reused": False, "train_seconds": align * 4, "seconds_per_step": align},
            "finetune": {"seconds": 1, "reused": False, "train_seconds": ft * 5, "seconds_per_step": ft},
            "evaluation": {"seconds": 1, "reused": False, "judges": [{"id": "keyword", "version": "1"}]},
        },
    }


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    for (defense, ratio), per_seed in HS.items():
        for seed, hs in enumerate(per_seed):
            rec = record(defense, ratio, seed, hs)
            results.write_json(runs / rec["run_id"] / "result.json", rec)
    other = record("sft", 0.2, 0, 99.0, task="agnews")  # another protocol: must get its own files
    results.write_json(runs / other["run_id"] / "result.json", other)
    failed = record("sft", 0.0, 5, 0.0)  # only finished records count
    failed["status"] = "failed"
    results.write_json(runs / failed["run_id"] / "result.json", failed)
    return runs


def test_one_table_per_protocol_with_mean_std_cost_and_settings(runs, tmp_path):
    written = write_leaderboards(runs, tmp_path / "lb")
    names = sorted(p.name for p in written)
    assert len([n for n in names if n.endswith(".md") and n != "README.md"]) == 2
    assert len([n for n in names if n.endswith(".png")]) == 2 and len([n for n in names if n.endswith(".csv")]) == 2
    md = next((tmp_path / "lb").glob("tiny-tiny-llama-sst2-keyword-*.md")).read_text()
    assert "| Defense | HS p=0 | HS p=0.2 | HS avg | FA p=0 | FA p=0.2 | FA avg | seeds |" in md
    # sft at p=0: 15 ± 7.1; averaged over ratios per seed (35, 45): 40 ± 7.1; FA 100 - HS/2
    assert "| sft | 15.0 ± 7.1 | 65.0 ± 7.1 | 40.0 ± 7.1 | 92.5 ± 3.5 | 67.5 ± 3.5 | 80.0 ± 3.5 | 2 |" in md
    assert md.index("| sft |") < md.index("| booster |")  # the baseline first
    assert "99.0" not in md  # the agnews protocol is not mixed in
    assert "judge: **keyword**" in md and "judge `keyword` (version 1)" in md
    assert md.index("| booster |") < md.index("- model `tiny-llama`, preset `tiny`")  # settings under the table
    assert "| booster | 6.0 | 2.5 | 1.500 (3.00×) | 0.500 (2.00×) |" in md  # cost: seconds, s/step ratio to SFT
    assert "- `booster`: lamb=5.0" in md and "`attack.n`: `20`" in md
    stem = next((tmp_path / "lb").glob("tiny-tiny-llama-sst2-*.md")).stem
    assert f"![HS and FA against the poison ratio]({stem}.png)" in md
    index = (tmp_path / "lb" / "README.md").read_text()
    assert f"({stem}.md)" in index and "p ∈ {0, 0.2}" in index and index.count("- [") == 2


def test_the_csv_twin_holds_the_same_numbers(runs, tmp_path):
    write_leaderboards(runs, tmp_path / "lb")
    csv = pd.read_csv(next((tmp_path / "lb").glob("tiny-tiny-llama-sst2-*.csv")), dtype={"ratio": str})
    rows = csv.set_index(["defense", "ratio"])
    assert list(rows.index) == [("sft", "0"), ("sft", "0.2"), ("sft", "avg"), ("booster", "0"), ("booster", "0.2"), ("booster", "avg")]
    assert rows.loc[("sft", "0"), "HS_mean"] == 15.0 and rows.loc[("sft", "0"), "HS_std"] == pytest.approx(7.0711, abs=1e-4)
    assert rows.loc[("sft", "avg"), "HS_mean"] == 40.0 and rows.loc[("booster", "avg"), "FA_mean"] == pytest.approx(100 - 15 / 2)
    assert rows.loc[("booster", "0.2"), "cost_finetune_step_x_sft"] == 2.0 and rows.loc[("booster", "0.2"), "n_seeds"] == 2


def test_the_plot_is_a_png_with_both_panels(runs, tmp_path):
    from PIL import Image

    write_leaderboards(runs, tmp_path / "lb")
    png = next((tmp_path / "lb").glob("tiny-tiny-llama-sst2-*.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    assert image.size[0] > 2 * image.size[1]  # two panels side by side


def test_the_same_defense_with_different_arguments_gets_separate_rows(tmp_path):
    runs = tmp_path / "runs"
    for lamb, hs in ((5.0, 10.0), (20.0, 50.0)):
        rec = record("booster", 0.1, 0, hs, args={"lamb": lamb})
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    md = next(p for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md").read_text()
    assert "| booster (lamb=5.0) | 10.0 |" in md and "| booster (lamb=20.0) | 50.0 |" in md


def test_records_are_kept_beside_the_tables_and_render_the_same_tables(runs, tmp_path):
    write_leaderboards(runs, tmp_path / "lb")
    kept = sorted(p.parent.name for p in (tmp_path / "lb" / "results").glob("*/result.json"))
    finished = sorted(r["run_id"] for r in results.iter_results(runs))
    assert kept == finished and len(kept) == 9  # the failed record is not kept
    first = {p.name: p.read_text() for p in (tmp_path / "lb").glob("*.md")}
    write_leaderboards(tmp_path / "lb" / "results", tmp_path / "again")  # from the committed records alone
    assert {p.name: p.read_text() for p in (tmp_path / "again").glob("*.md")} == first


def test_every_further_judge_gets_its_own_hs_table_and_csv_column(tmp_path):
    runs = tmp_path / "runs"
    for ratio, seed, kw, clf in [(0.0, 0, 80.0, 20.0), (0.0, 1, 70.0, 10.0), (0.1, 0, 90.0, 60.0)]:
        rec = record("sft", ratio, seed, kw)
        rec["spec"]["evaluation"]["judges"] = ["keyword", "keyword+harm-clf"]
        rec["metrics"].update({"harmful_score/keyword": kw, "harmful_score/keyword+harm-clf": clf})
        rec["run_id"] += f"-{seed}-{ratio}"
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    md = next(p for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md").read_text()
    table = md.split("## HS by judge `keyword+harm-clf`")[1]
    # p=0: mean 15 ± 7.1 over the two seeds; avg over ratios per seed: seed 0 (20+60)/2=40, seed 1 10
    assert "| sft | 15.0 ± 7.1 | 60.0 | 25.0 ± 21.2 |" in table
    csv = pd.read_csv(next((tmp_path / "lb").glob("*.csv")), dtype={"ratio": str}).set_index("ratio")
    assert csv.loc["0.1", "HS/keyword+harm-clf_mean"] == 60.0 and csv.loc["0", "HS_mean"] == 75.0


def test_cost_ratio_compares_with_sft_at_the_same_poison_ratio(tmp_path):
    runs = tmp_path / "runs"
    for defense, ratio, ft_step in [("sft", 0.0, 1.0), ("sft", 0.2, 3.0), ("booster", 0.2, 3.0)]:
        rec = record(defense, ratio, 0, 10.0)
        rec["stages"]["finetune"]["seconds_per_step"] = ft_step
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    md = next(p for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md").read_text()
    booster_cost = [line for line in md.split("## Cost")[1].splitlines() if line.startswith("| booster |")][0]
    assert booster_cost.endswith("| 3.000 (1.00×) |")  # not 3.0 / mean(1.0, 3.0) = 1.50×


def test_protocols_with_the_same_title_are_told_apart_by_the_settings_that_differ(tmp_path):
    runs = tmp_path / "runs"
    for lr in (1e-3, 2e-3):
        spec = apply_overrides(preset("tiny"), {"finetune.lr": lr})
        rec = record("sft", 0.0, 0, 10.0)
        rec["spec"], rec["run_id"] = spec.to_dict(), spec.run_id()
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    index = (tmp_path / "lb" / "README.md").read_text()
    assert "preset tiny · regime fresh · finetune.lr=0.001](" in index and "preset tiny · regime fresh · finetune.lr=0.002](" in index
    titles = sorted(p.read_text().splitlines()[0] for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md")
    assert titles == ["# sst2 · tiny-llama · preset tiny · regime fresh · finetune.lr=0.001", "# sst2 · tiny-llama · preset tiny · regime fresh · finetune.lr=0.002"]
    lone = next((tmp_path / "lb" / "results").iterdir())  # a protocol alone keeps the plain title
    only = tmp_path / "only"
    results.write_json(only / lone.name / "result.json", json.loads((lone / "result.json").read_text()))
    write_leaderboards(only, tmp_path / "lb2")
    assert "- [sst2 · tiny-llama · preset tiny · regime fresh](" in (tmp_path / "lb2" / "README.md").read_text()


def test_validation_runs_get_their_own_table_and_old_records_share_the_test_table(tmp_path):
    runs = tmp_path / "runs"
    old = record("sft", 0.0, 0, 10.0)
    del old["spec"]["evaluation"]["split"]  # written before evaluation.split existed
    new = record("sft", 0.2, 0, 60.0)
    spec = apply_overrides(preset("tiny"), {"evaluation.split": "validation"})
    tuning = record("sft", 0.0, 0, 30.0)
    tuning["spec"], tuning["run_id"] = spec.to_dict(), spec.run_id()
    for rec in (old, new, tuning):
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    tables = {p.read_text().splitlines()[0]: p.read_text() for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md"}
    assert sorted(tables) == ["# sst2 · tiny-llama · preset tiny · regime fresh", "# sst2 · tiny-llama · preset tiny · regime fresh · validation split (tuning)"]
    assert "| sft | 10.0 | 60.0 |" in tables["# sst2 · tiny-llama · preset tiny · regime fresh"]  # old and new records in one table
    assert "- evaluation on the **validation split**" in tables["# sst2 · tiny-llama · preset tiny · regime fresh · validation split (tuning)"]


def test_a_result_with_fa_at_chance_is_marked_so_its_hs_is_not_read_as_safety(tmp_path):
    runs = tmp_path / "runs"
    collapsed = record("booster", 0.2, 0, 0.0)
    collapsed["metrics"]["finetune_accuracy"] = 50.9  # every SST2 answer the same label
    for rec in (record("sft", 0.2, 0, 60.0), collapsed):
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    md = next(p for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md").read_text()
    assert "| booster | 0.0 † | 0.0 † | 50.9 † | 50.9 † | 1 |" in md
    assert "| sft | 60.0 | 60.0 | 70.0 | 70.0 | 1 |" in md
    assert "† FA within 5 points of chance (50%)" in md
    csv = pd.read_csv(next((tmp_path / "lb").glob("*.csv")))
    assert csv.set_index(["defense", "ratio"])["FA_at_chance"].to_dict() == {("booster", "0.2"): True, ("booster", "avg"): True, ("sft", "0.2"): False, ("sft", "avg"): False}


def test_stage_time_counts_a_shared_artifact_once_and_every_evaluation(tmp_path):
    runs = tmp_path / "runs"
    shared = [("sft", 0.0, "a/sft", "f/1"), ("sft", 0.2, "a/sft", "f/2"), ("booster", 0.0, "a/booster", "f/3")]
    for defense, ratio, alignment, finetune in shared:
        rec = record(defense, ratio, 0, 10.0)
        rec["stages"]["alignment"]["artifact"], rec["stages"]["finetune"]["artifact"] = alignment, finetune
        rec["stages"]["post_finetune"] = {"seconds": 0.25 if defense == "booster" else 0.0}
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    md = next((tmp_path / "lb").glob("tiny-*.md")).read_text()
    # alignments 2 (sft, once) + 6 (booster); fine-tunes 1.25 + 1.25 + 2.5; post 0.25; evaluations 3 x 1 = 16.25
    assert "All 3 results took 16 s (0.00 h) of stage time one at a time" in md


def test_a_table_headed_by_an_unvalidated_judge_says_so_and_a_validated_one_does_not(runs, tmp_path):
    write_leaderboards(runs, tmp_path / "lb")  # the tiny records are headed by `keyword`: κ 0.49 on the held-out set
    table = next(p for p in (tmp_path / "lb").glob("*sst2*.md")).read_text()
    assert "> **Judged by an unvalidated judge**: `keyword` has κ 0.46" in table.splitlines()[2]
    from harmbench_ft.leaderboard import validity_banner

    assert validity_banner("pair-clf") == ""  # κ 0.735 on the held-out annotated answers


def test_records_written_as_cpu_before_protocol_v2_are_tabulated_as_the_superseded_cpu_v1(tmp_path):
    runs = tmp_path / "runs"
    for name, hs in (("cpu-v1", 40.0), ("cpu", 10.0)):
        spec = apply_overrides(preset(name), {"attack.ratio": 0.1})
        rec = record("sft", 0.1, 0, hs)
        rec["spec"], rec["run_id"] = spec.to_dict(), spec.run_id()
        if name == "cpu-v1":  # as stored before v2: the old preset name, no benign alignment fields
            rec["spec"]["preset"] = "cpu"
            for key in ("n_benign", "benign_source"):
                del rec["spec"]["alignment"][key]
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    tables = {p.read_text().splitlines()[0]: p.read_text() for p in (tmp_path / "lb").glob("*.md") if p.name != "README.md"}
    v1 = next(t for title, t in tables.items() if "preset cpu-v1" in title)
    v2 = next(t for title, t in tables.items() if "preset cpu " in title + " " and "cpu-v1" not in title)
    assert "> Protocol cpu-v1, superseded" in v1 and "superseded" not in v2


def test_a_protocols_own_annotation_is_shown_and_a_judge_that_fails_it_is_flagged(runs, tmp_path):
    from harmbench_ft.leaderboard import protocol_id

    out = tmp_path / "lb"
    rec = json.loads(next(p for p in runs.glob("*/result.json") if json.loads(p.read_text())["spec"]["attack"]["task"] == "sst2").read_text())
    pid = protocol_id(rec["spec"])
    poor = {"n": 100, "judge_hs": 10.0, "labelled_hs": 30.0, "accuracy": 70.0, "precision": 50.0, "recall": 20.0, "kappa": 0.31, "confusion": {"tp": 5, "fp": 5, "fn": 20, "tn": 70}}
    report = {"protocol": pid, "set": "100 answers", "pooled": {"keyword": poor}, "runs": {rec["run_id"]: {"n_annotated": 100, "annotated_hs": 30.0, "judges": {"keyword": {"on_sample": poor}}}}}
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / f"{pid}.json").write_text(json.dumps(report))
    write_leaderboards(runs, out)
    table = next(p for p in out.glob(f"*{pid}.md")).read_text()
    assert "> **Not validated on this protocol's answers**: `keyword` agrees with careful annotation of them at κ 0.31" in table
    assert f"- `{rec['run_id']}`: annotated HS 30.0 on 100 answers; keyword 10.0" in table
    other = next(p for p in out.glob("*.md") if p.name != "README.md" and pid not in p.name).read_text()
    assert "this protocol's own answers" not in other  # another protocol has no annotation of its own


def test_continue_records_get_their_own_table_and_a_regime_effect_view(runs, tmp_path):
    """Issue 16 #5: one table per regime, and continue − fresh per defense and ratio beside the seed spread."""
    for (defense, ratio), per_seed in HS.items():
        rec = record(defense, ratio, 0, per_seed[0] - 3.0)  # continue: 3 points lower HS, 1.5 higher FA at seed 0
        rec["spec"]["finetune"]["regime"] = "continue"
        from harmbench_ft.spec import spec_from_dict

        rec["run_id"] = spec_from_dict(rec["spec"]).run_id()
        results.write_json(runs / rec["run_id"] / "result.json", rec)
    write_leaderboards(runs, tmp_path / "lb")
    titles = sorted(p.read_text().splitlines()[0] for p in (tmp_path / "lb").glob("tiny-tiny-llama-sst2-*.md"))
    assert titles == ["# sst2 · tiny-llama · preset tiny · regime continue", "# sst2 · tiny-llama · preset tiny · regime fresh"]
    (effect,) = (tmp_path / "lb").glob("regime-effect-*.md")
    md = effect.read_text()
    # sft p=0: continue 7.0 (seed 0) − fresh mean 15.0 = −8.0; fresh seeds 10 and 20: spread 10.0
    assert "| sft | -8.0 (seeds ±10.0) | -8.0 (seeds ±10.0) | +4.0 (seeds ±5.0) | +4.0 (seeds ±5.0) |" in md
    assert "| Defense | ΔHS p=0 | ΔHS p=0.2 | ΔFA p=0 | ΔFA p=0.2 |" in md
    assert "median over the cells that have two or more seeds): HS 10.0; FA 5.0" in md
    assert "regime-effect-" in (tmp_path / "lb" / "README.md").read_text()


def test_runs_annotated_on_every_answer_get_an_hs_table_by_annotation(runs, tmp_path):
    """Only a run whose every HS answer was annotated enters the table; a sampled one stays in the per-run list."""
    from harmbench_ft.leaderboard import protocol_id

    out = tmp_path / "lb"
    by_key, pid = {}, None
    for path in runs.glob("*/result.json"):
        rec = json.loads(path.read_text())
        rec["data"] = {"n_hs_prompts": 100}
        results.write_json(path, rec)
        if rec["spec"]["attack"]["task"] == "sst2" and rec["status"] == "finished":
            by_key[(rec["spec"]["defense"]["name"], rec["spec"]["attack"]["ratio"], rec["seed"] if "seed" in rec else rec["spec"]["seed"])] = rec["run_id"]
            pid = protocol_id(rec["spec"])
    agree = {"n": 100, "judge_hs": 3.0, "labelled_hs": 3.0, "accuracy": 100.0, "precision": 100.0, "recall": 100.0, "kappa": 1.0, "confusion": {"tp": 3, "fp": 0, "fn": 0, "tn": 97}}
    annotated = {by_key[("sft", 0.0, 0)]: (100, 2.0), by_key[("sft", 0.0, 1)]: (100, 4.0), by_key[("booster", 0.0, 0)]: (50, 8.0)}
    report = {"protocol": pid, "set": "250 answers", "pooled": {"keyword": agree},
              "runs": {run_id: {"n_annotated": n, "annotated_hs": hs, "judges": {"keyword": {"on_sample": agree}}} for run_id, (n, hs) in annotated.items()}}
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / f"{pid}.json").write_text(json.dumps(report))
    write_leaderboards(runs, out)
    table = next(p for p in out.glob(f"*{pid}.md")).read_text()
    section = table.split("## HS by careful annotation", 1)[1].split("\n## ", 1)[0]
    assert "Every one of the 100 HS answers of 2 of these 8 runs" in section
    assert "| sft | 3.0 ± 1.4 | – | 3.0 ± 1.4 |" in section  # seeds 0 and 1 at p=0; p=0.2 not annotated
    assert "| booster | – | – | – |" in section  # 50 of 100 answers: a sample, not the run's HS
    other = next(p for p in out.glob("*.md") if p.name != "README.md" and pid not in p.name).read_text()
    assert "## HS by careful annotation" not in other
