"""The task interface: the benign data a user fine-tunes on, its test set and its scorer."""

from __future__ import annotations

from typing import ClassVar

from harmbench_ft.data.formatting import Example


class Task:
    """A fine-tuning task, registered by a plugin through ``hft_register_tasks``.

    Subclasses set the class attributes and implement :meth:`example` and :meth:`score`.
    """

    name: ClassVar[str]
    train_source: ClassVar[str]  # dataset name in harmbench_ft.data.sources.DATASETS
    test_source: ClassVar[str]
    scored: ClassVar[bool] = True  # False for generation-only tasks (alpaca): no fine-tune accuracy
    max_new_tokens: ClassVar[int] = 200  # answer budget when evaluation.task_max_new_tokens is None (protocol.md: up to 200)
    test_size: ClassVar[int | None] = None  # the protocol's test rows when evaluation.n_task_test is 0 (None: all)
    # FA (%) of guessing among the labels (None: not a label task). Leaderboards mark results whose FA is
    # within a few points of it: a model that no longer does the task has an HS that says nothing.
    chance_accuracy: ClassVar[float | None] = None

    def example(self, row: dict) -> Example:
        """The row as an (instruction, input, output) example; output is the reference answer."""
        raise NotImplementedError

    def score(self, response: str, row: dict) -> bool:
        """Whether a generated response to the row's prompt is correct."""
        raise NotImplementedError
