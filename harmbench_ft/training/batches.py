"""Turn examples into a stream of optimizer steps, each a list of collated micro-batches."""

from __future__ import annotations

import math
import random

from harmbench_ft.data.formatting import Example, collate, tokenize_example
from harmbench_ft.spec import TrainConfig

GROUP_MICRO_BATCHES = 8  # length grouping sorts windows of this many micro-batches (HF's megabatch is 50)


class BatchStream:
    """Endless, reshuffled each epoch with a fixed seed: two streams of equally many rows built with
    the same seed visit rows in the same order (so "harmful" and "harmful_refusals" stay paired;
    with length grouping, once `pair_streams` gave them the same `order_lengths`).

    With ``train.group_by_length`` each epoch's shuffled order is cut into windows of
    GROUP_MICRO_BATCHES micro-batches, each window sorted by length, and the micro-batches shuffled
    again: rows of similar length share a micro-batch, so dynamic padding wastes little, while every
    row is still seen once per epoch in a seeded random order.
    """

    def __init__(self, examples: list[Example], tokenizer, train: TrainConfig, seed: int) -> None:
        if not examples:
            raise ValueError("a batch stream needs at least one example")
        self.rows = [tokenize_example(tokenizer, e, train.max_length) for e in examples]
        self.order_lengths = [len(r["input_ids"]) for r in self.rows]  # what length grouping sorts by
        self.pad_id = tokenizer.pad_token_id
        self.micro = train.micro_batch_size or train.batch_size
        self.accumulation = train.batch_size // self.micro
        self.group_by_length = train.group_by_length
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.rows_served = 0

    def _epoch_order(self) -> list[int]:
        """The visiting order of one epoch, consumed from the end (pop)."""
        order = list(range(len(self.rows)))
        self.rng.shuffle(order)
        if not self.group_by_length:
            return order
        window = self.micro * GROUP_MICRO_BATCHES
        chunks = []
        for start in range(0, len(order), window):
            ranked = sorted(order[start : start + window], key=lambda i: self.order_lengths[i])
            chunks += [ranked[j : j + self.micro] for j in range(0, len(ranked), self.micro)]
        full = [c for c in chunks if len(c) == self.micro]
        self.rng.shuffle(full)
        chunks = full + [c for c in chunks if len(c) < self.micro]  # a short chunk last keeps the others whole
        return [i for chunk in reversed(chunks) for i in reversed(chunk)]  # pop() serves chunks in order

    def _next_rows(self, k: int) -> list[dict]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = self._epoch_order()
            out.append(self.rows[self.order.pop()])
        self.rows_served += k
        return out

    def state(self) -> dict:
        """Where the stream is (for a mid-stage checkpoint): its RNG, the rest of this epoch's order, rows served."""
        return {"rng": self.rng.getstate(), "order": list(self.order), "rows_served": self.rows_served}

    def load_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.rows_served = list(state["order"]), int(state["rows_served"])

    def next_step(self) -> list[dict]:
        return [collate(self._next_rows(self.micro), self.pad_id) for _ in range(self.accumulation)]


def pair_streams(streams: list[BatchStream]) -> None:
    """Streams of equally many rows keep one visiting order under length grouping: they are grouped
    by their elementwise longest row (RepNoise pairs "harmful" with "harmful_refusals" row by row)."""
    by_count: dict[int, list[BatchStream]] = {}
    for stream in streams:
        by_count.setdefault(len(stream.rows), []).append(stream)
    for group in by_count.values():
        shared = [max(col) for col in zip(*(s.order_lengths for s in group))]
        for stream in group:
            stream.order_lengths = shared


def steps_for(n_rows: int, train: TrainConfig) -> int:
    """Optimizer steps for `epochs` passes over n_rows, capped by max_steps.

    max_steps=0 trains nothing: the stage's adapter stays zero, so `--set finetune.max_steps=0`
    evaluates the aligned model itself and `--set alignment.train.max_steps=0` the base model.
    """
    steps = max(1, math.ceil(train.epochs * n_rows / train.batch_size))
    return min(steps, train.max_steps) if train.max_steps is not None else steps
