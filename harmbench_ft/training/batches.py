"""Turn examples into a stream of optimizer steps, each a list of collated micro-batches."""

from __future__ import annotations

import math
import random

from harmbench_ft.data.formatting import Example, collate, tokenize_example
from harmbench_ft.spec import TrainConfig


class BatchStream:
    """Endless, reshuffled each epoch with a fixed seed: two streams of equally many rows built with
    the same seed visit rows in the same order (so "harmful" and "harmful_refusals" stay paired)."""

    def __init__(self, examples: list[Example], tokenizer, train: TrainConfig, seed: int) -> None:
        if not examples:
            raise ValueError("a batch stream needs at least one example")
        self.rows = [tokenize_example(tokenizer, e, train.max_length) for e in examples]
        self.pad_id = tokenizer.pad_token_id
        self.micro = train.micro_batch_size or train.batch_size
        self.accumulation = train.batch_size // self.micro
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.rows_served = 0

    def _next_rows(self, k: int) -> list[dict]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append(self.rows[self.order.pop()])
        self.rows_served += k
        return out

    def next_step(self) -> list[dict]:
        return [collate(self._next_rows(self.micro), self.pad_id) for _ in range(self.accumulation)]


def steps_for(n_rows: int, train: TrainConfig) -> int:
    """Optimizer steps for `epochs` passes over n_rows, capped by max_steps."""
    steps = max(1, math.ceil(train.epochs * n_rows / train.batch_size))
    return min(steps, train.max_steps) if train.max_steps else steps
