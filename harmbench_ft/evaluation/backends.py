"""The generation-backend interface; implementations are plugins (``hf`` is built in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class ServedModel:
    """The model under evaluation, in memory and as artifacts on disk (for engines that load from disk)."""

    model: Any  # the merged torch model (base + alignment + final fine-tune adapter)
    tokenizer: Any
    base: str  # model name or path
    alignment_adapter: Path | None = None
    final_adapter: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Greedy generation for a list of rendered prompts."""

    name: ClassVar[str]

    def generate(self, served: ServedModel, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What generated the answers, for the result's provenance (an engine adds its settings once it has run)."""
        return {"name": self.name}
