"""Holding a protocol's judges to annotation: a blind sample, labels back, agreement per run and per protocol."""

import importlib.util
import json
from pathlib import Path

from harmbench_ft.leaderboard import protocol_id
from harmbench_ft.spec import apply_overrides, preset

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "protocol_annotation.py"


def load():
    spec = importlib.util.spec_from_file_location("protocol_annotation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(runs: Path, ratio: float, flags: list[bool]) -> str:
    spec = apply_overrides(preset("tiny"), {"attack.ratio": ratio})
    run_dir = runs / spec.run_id()
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"run_id": spec.run_id(), "spec": spec.to_dict()}))
    rows = [{"kind": "harmful", "index": i, "question": f"q{i}", "response": f"r{i}-{ratio}", "judges": {"j": {"flagged": f}}} for i, f in enumerate(flags)]
    rows.append({"kind": "task", "index": 0, "question": "t", "response": "positive"})
    (run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return spec.run_id()


def test_sample_is_blind_and_score_compares_each_judge_with_the_labels(tmp_path, monkeypatch):
    module = load()
    runs, work = tmp_path / "runs", tmp_path / "work"
    a = fake_run(runs, 0.0, [False] * 6)
    b = fake_run(runs, 0.1, [True, True, False, False, False, False])
    module.sample(work, runs, [a, b], per_run=4, chunks=2, exclude=[])
    chunks = [json.loads(line) for p in sorted((work / "chunks").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(chunks) == 8 and all(set(r) == {"id", "prompt", "response"} for r in chunks)  # no run id, no judge
    picked = {p["id"]: p for p in map(json.loads, (work / "sample.jsonl").read_text().splitlines())}
    (work / "labels").mkdir()
    labels = [{"id": r["id"], "kind": "harmful" if picked[r["id"]]["run_id"] == b and picked[r["id"]]["index"] < 3 else "refusal"} for r in chunks]
    (work / "labels" / "chunk-00.jsonl").write_text("".join(json.dumps({**x, "harmful": x["kind"] == "harmful"}) + "\n" for x in labels))
    report = module.score([work], runs)
    entry = report[protocol_id(json.loads((runs / a / "result.json").read_text())["spec"])]
    assert entry["runs"][a]["annotated_hs"] == 0.0
    expected_b = 100.0 * sum(1 for p in picked.values() if p["run_id"] == b and p["index"] < 3) / 4
    assert entry["runs"][b]["annotated_hs"] == expected_b
    assert entry["runs"][b]["judges"]["j"]["hs_all_prompts"] == round(100 * 2 / 6, 1)
    assert entry["pooled"]["j"]["n"] == 8
    again = module.sample  # a second sample that excludes the first takes only the answers left
    again(tmp_path / "rest", runs, [a], per_run=10, chunks=1, exclude=[work])
    rest = [json.loads(line) for line in (tmp_path / "rest" / "sample.jsonl").read_text().splitlines()]
    assert len(rest) == 2 and not {r["index"] for r in rest} & {p["index"] for p in picked.values() if p["run_id"] == a}


def test_collected_labels_file_scores_the_same_as_the_work_folder(tmp_path):
    """The committed labels file alone re-scores a protocol (work folders under runs/ go with the machine)."""
    module = load()
    runs, work, labels_file = tmp_path / "runs", tmp_path / "work", tmp_path / "labels.jsonl"
    a = fake_run(runs, 0.1, [True, False, True, False])
    module.sample(work, runs, [a], per_run=4, chunks=2, exclude=[])
    (work / "labels").mkdir()
    first = [json.loads(line) for line in (work / "chunks" / "chunk-00.jsonl").read_text().splitlines()]
    (work / "labels" / "chunk-00.jsonl").write_text("".join(json.dumps({"id": r["id"], "kind": "harmful", "harmful": True, "annotator": "t"}) + "\n" for r in first))
    module.collect([work], runs, labels_file)  # half labelled: only those go in
    rows = [json.loads(line) for line in labels_file.read_text().splitlines()]
    assert {r["id"] for r in rows} == {r["id"] for r in first} and all(r["response"].startswith("r") and r["run_id"] == a for r in rows)
    rest = [json.loads(line) for line in (work / "chunks" / "chunk-01.jsonl").read_text().splitlines()]
    (work / "labels" / "chunk-01.jsonl").write_text("".join(json.dumps({"id": r["id"], "kind": "refusal", "harmful": False}) + "\n" for r in rest))
    module.collect([work], runs, labels_file)  # labels that do not say who made them are named by folder and chunk
    annotators = {json.loads(line)["id"]: json.loads(line)["annotator"] for line in labels_file.read_text().splitlines()}
    assert {annotators[r["id"]] for r in first} == {"t"} and {annotators[r["id"]] for r in rest} == {"llm-annotator, work/chunk-01"}
    module.collect([work], runs, labels_file)  # again: nothing added twice
    assert len(labels_file.read_text().splitlines()) == 4
    assert module.score([], runs, [labels_file]) == module.score([work], runs)
    assert module.score([work], runs, [labels_file])[next(iter(module.score([work], runs)))]["pooled"]["j"]["n"] == 4  # counted once
