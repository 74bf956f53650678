"""Batch streams: every row once per epoch, seeded order, and length grouping that keeps pairs paired."""

import random
import re

from harmbench_ft import Example
from harmbench_ft.models.tiny import byte_tokenizer
from harmbench_ft.spec import TrainConfig
from harmbench_ft.training.batches import BatchStream, pair_streams

RNG = random.Random(3)
ROWS = [Example(f"question {i}", "", "answer " + "x" * RNG.randint(1, 120)) for i in range(50)]  # 50: not a multiple of 4


def _cfg(group: bool) -> TrainConfig:
    return TrainConfig(batch_size=4, max_length=256, group_by_length=group)


def _epoch(stream: BatchStream, steps: int) -> list[dict]:
    return [b for _ in range(steps) for b in stream.next_step()]


def test_grouped_stream_serves_every_row_once_per_epoch_with_less_padding():
    tok = byte_tokenizer()
    grouped, plain = BatchStream(ROWS, tok, _cfg(True), seed=0), BatchStream(ROWS, tok, _cfg(False), seed=0)
    g_batches, p_batches = _epoch(grouped, 12), _epoch(plain, 12)  # 48 of 50 rows
    g_rows = [tok.decode([t for t in r if t != tok.pad_token_id]) for b in g_batches for r in b["input_ids"].tolist()]
    assert len(set(g_rows)) == 48, "a row was served twice within one epoch"

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(g_batches) < 0.5 * padding(p_batches)


def test_grouped_order_is_seeded_and_epochs_differ():
    tok = byte_tokenizer()
    a, b, c = (BatchStream(ROWS, tok, _cfg(True), seed=s) for s in (5, 5, 6))
    first = [r for _ in range(13) for r in a._next_rows(4)]
    assert [r["input_ids"] for r in first] == [r["input_ids"] for _ in range(13) for r in b._next_rows(4)]
    assert [r["input_ids"] for r in first] != [r["input_ids"] for _ in range(13) for r in c._next_rows(4)]
    second = [r for _ in range(12) for r in a._next_rows(4)]
    assert [r["input_ids"] for r in second] != [r["input_ids"] for r in first[2:50]]


def test_pair_streams_keeps_paired_rows_together_under_grouping():
    tok = byte_tokenizer()
    answers = [Example(e.instruction, "", "I cannot help with that.") for e in ROWS]  # same prompts, other lengths
    harmful, refusals = BatchStream(ROWS, tok, _cfg(True), seed=1), BatchStream(answers, tok, _cfg(True), seed=1)
    pair_streams([harmful, refusals])
    for _ in range(30):  # crosses epochs
        h, r = harmful._next_rows(4), refusals._next_rows(4)
        question = lambda row: re.search(r"question \d+", tok.decode(row["input_ids"])).group()  # noqa: E731
        assert [question(x) for x in h] == [question(x) for x in r]
