"""GPTConfig: the shape of the network, and the named presets we train."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

GPT2_VOCAB_SIZE = 50257  # r50k_base: 50,256 BPE merges + <|endoftext|>


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 128
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"GPTConfig.dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be a bool, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build a config from JSON metadata, refusing unknown or missing fields."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        missing = names - set(data)
        if unknown or missing:
            raise ValueError(
                "GPT config fields do not match: "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**data)

    def replace(self, **overrides: Any) -> GPTConfig:
        return GPTConfig(**{**self.to_dict(), **overrides})


PRESETS: dict[str, GPTConfig] = {
    # Seconds on a CPU: for tests and smoke runs. The vocabulary stays GPT-2's so that the
    # tokenizer, checkpoints and exports are exercised exactly as for the real sizes.
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
    # The configuration the original notebook trains (~30M parameters, 19M of them embeddings).
    "seed": GPTConfig(block_size=128, n_layer=6, n_head=6, n_embd=384),
    # The ~50M model the original README promises, with room for a whole TinyStories story.
    "50m": GPTConfig(block_size=512, n_layer=8, n_head=8, n_embd=512),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
