"""Records are validated where they are read: a run id read from a file is never a path; foreign records are skipped."""

import json

import pytest

from harmbench_ft import results
from harmbench_ft.leaderboard import write_leaderboards
from harmbench_ft.spec import apply_overrides, preset


def good_record(ratio=0.1):
    spec = apply_overrides(preset("tiny"), {"attack.ratio": ratio})
    return {"version": 1, "status": "finished", "run_id": spec.run_id(), "spec": spec.to_dict(), "metrics": {"harmful_score": 10.0, "harmful_score_plus": 10.0, "finetune_accuracy": 90.0},
            "stages": {"evaluation": {"seconds": 1, "reused": False, "judges": [{"id": "keyword"}]}}}


@pytest.mark.parametrize("change", [{"run_id": "../../escaped"}, {"run_id": "/tmp/escaped"}, {"version": 99}, {"status": "weird"}, {"metrics": None}])
def test_leaderboard_skips_and_names_a_bad_record_and_writes_nothing_outside_out(tmp_path, capsys, change):
    runs = tmp_path / "runs"
    ok = good_record()
    results.write_json(runs / ok["run_id"] / "result.json", ok)
    bad = {**good_record(0.2), **change}
    folder = runs / good_record(0.2)["run_id"]
    results.write_json(folder / "result.json", bad)
    out = tmp_path / "deep" / "lb"
    written = write_leaderboards(runs, out)
    assert all(out in p.parents for p in written)
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("**/escaped"))
    assert sorted(p.parent.name for p in (out / "results").glob("*/result.json")) == [ok["run_id"]]
    assert f"skipped {folder / 'result.json'}" in capsys.readouterr().err


def test_a_truncated_record_is_skipped_by_the_leaderboard_and_one_line_for_read_result(tmp_path):
    runs = tmp_path / "runs"
    ok = good_record()
    results.write_json(runs / ok["run_id"] / "result.json", ok)
    (runs / "broken").mkdir()
    (runs / "broken" / "result.json").write_text('{"version": 1, "sta')
    assert [r["run_id"] for r in results.iter_results(runs)] == [ok["run_id"]]
    with pytest.raises(results.RecordError, match="not valid JSON"):
        results.read_result(runs / "broken")
    assert results.read_result(runs / ok["run_id"])["run_id"] == ok["run_id"]


def test_a_record_that_is_not_finished_is_no_result_and_is_named(tmp_path):
    rec = {**good_record(), "status": "failed"}
    results.write_json(tmp_path / rec["run_id"] / "result.json", rec)
    skipped = []
    assert list(results.iter_results(tmp_path, on_skip=skipped.append)) == []
    assert "status 'failed', not finished" in skipped[0]
    with pytest.raises(results.RecordError):
        results.read_result(tmp_path / rec["run_id"])
