"""A model the service has loaded: the network plus what identifies the checkpoint it came from.

The reloader produces these; the engine serves from one and reports its ``version`` with every
answer, so a client always knows which checkpoint wrote its story."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from model.checkpoint import CheckpointMeta
from model.gpt import GPT
from model.tokenizer import Tokenizer, get_tokenizer


@dataclass(frozen=True)
class LoadedModel:
    model: GPT
    meta: CheckpointMeta
    path: Path  # the checkpoint's metadata file
    version: str  # "<run>/<checkpoint name>", unique under CHECKPOINT_DIR
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def run(self) -> str:
        """The run it belongs to: the name clients pick it by (``model`` in a request)."""
        return self.version.partition("/")[0]

    @property
    def tokenizer(self) -> Tokenizer:
        """The vocabulary this checkpoint learned (GPT-2's, or GPT-2's first merges)."""
        return get_tokenizer(self.model.config.vocab_size)
