"""GPTConfig: the shape of the network, and the named presets we train.

The defaults are GPT-2's network (learned positions, LayerNorm, GELU, tied head), so a config
saved before the architecture options existed means what it meant then. The options are the
changes that made small GPTs learn faster per token since 2019 (Llama's rotary positions,
RMSNorm and SwiGLU; ReLU² and QK-norm from the modded-nanogpt speedrun; an untied head).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

GPT2_VOCAB_SIZE = 50257  # r50k_base: 256 bytes, 50,000 BPE merges, <|endoftext|>
# GPT-2's tokenizer with fewer merges: its first ``size - 1`` tokens (the 256 bytes, then merges
# in GPT-2's order) plus <|endoftext|> as the last id. Still GPT-2's BPE: the same pieces, and
# ids below the cut are GPT-2's ids. The vocabulary is ``GPTConfig.vocab_size``; these are its
# names (and `gpt2-<size>` names any other size from 257 to 50,257).
VOCABULARIES: dict[str, int] = {
    "gpt2": GPT2_VOCAB_SIZE,
    "gpt2-16k": 16384,
    "gpt2-8k": 8192,
    "gpt2-4k": 4096,
}
MIN_VOCAB_SIZE = 257  # every byte, and <|endoftext|>
VOCAB_SIZE_RANGE = (
    f"{MIN_VOCAB_SIZE} to {GPT2_VOCAB_SIZE} tokens (every byte and <|endoftext|> to all of GPT-2's)"
)


def is_vocab_size(size: int) -> bool:
    """Whether GPT-2's first merges make a vocabulary of ``size`` tokens (VOCAB_SIZE_RANGE)."""
    return MIN_VOCAB_SIZE <= size <= GPT2_VOCAB_SIZE


ROPE_THETA = 10000.0  # Llama's (and Hugging Face's default) rotary base
NORM_EPS = 1e-5  # LayerNorm's default, and Llama 2's RMSNorm epsilon
VOCAB_MULTIPLE = 64  # pad_vocab rounds the output matrix up to this many rows

Position = Literal["learned", "rotary"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "relu2", "swiglu"]


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 128
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    # How positions enter: GPT-2's learned table (wpe), or rotary embeddings of the queries
    # and keys (no table; attention sees relative positions, so generation can slide).
    position: Position = "learned"
    norm: Norm = "layernorm"
    # The MLP's nonlinearity: GPT-2's tanh GELU, ReLU², or SwiGLU (a gated MLP whose hidden
    # width is cut to 8/3 of n_embd so it holds as many weights as the 4× ones).
    activation: Activation = "gelu"
    # Normalise each head's queries and keys (RMSNorm over head_dim) before attention.
    qk_norm: bool = False
    tie_embeddings: bool = True
    # Round the embedding/output rows up to a multiple of 64 for GPU matmuls; the extra tokens
    # are never predicted (their logits are masked) and never exported.
    pad_vocab: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if not is_vocab_size(self.vocab_size):
            raise ValueError(
                f"GPTConfig.vocab_size must be {VOCAB_SIZE_RANGE}, got {self.vocab_size}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"GPTConfig.dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "qk_norm", "tie_embeddings", "pad_vocab"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name, kind in (("position", Position), ("norm", Norm), ("activation", Activation)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(
                    f"GPTConfig.{name} must be one of {', '.join(get_args(kind))}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.position == "rotary" and self.head_dim % 2:
            raise ValueError(
                f"rotary positions rotate pairs of dimensions: n_embd / n_head "
                f"({self.n_embd} / {self.n_head} = {self.head_dim}) must be even"
            )

    @property
    def vocabulary(self) -> str:
        return vocabulary_name(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4 × n_embd, or for SwiGLU's three matrices 8/3 × n_embd
        rounded up to a multiple of 64 (Llama's rule), about as many weights."""
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices."""
        if self.pad_vocab:
            return VOCAB_MULTIPLE * math.ceil(self.vocab_size / VOCAB_MULTIPLE)
        return self.vocab_size

    @property
    def is_gpt2(self) -> bool:
        """Whether this is GPT-2's own network (what GPT-2 exports can express)."""
        return (
            self.position == "learned"
            and self.norm == "layernorm"
            and self.activation == "gelu"
            and not self.qk_norm
            and self.tie_embeddings
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build a config from JSON metadata, refusing unknown fields and missing ones; an
        option added since (it has a default that reproduces the network before it) may be
        missing."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        missing = set(ORIGINAL_FIELDS) - set(data)
        if unknown or missing:
            raise ValueError(
                "GPT config fields do not match: "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**data)

    def replace(self, **overrides: Any) -> GPTConfig:
        return GPTConfig(**{**self.to_dict(), **overrides})


def vocabulary_size(name: str) -> int:
    """The vocab_size a vocabulary name stands for: a name of VOCABULARIES, or `gpt2-<size>`."""
    if name in VOCABULARIES:
        return VOCABULARIES[name]
    prefix, _, digits = name.partition("-")
    if prefix == "gpt2" and digits.isdigit() and is_vocab_size(int(digits)):
        return int(digits)
    raise ValueError(
        f"unknown vocabulary {name!r}: choose one of {', '.join(VOCABULARIES)}, or gpt2-<size> "
        f"for {VOCAB_SIZE_RANGE}"
    )


def vocabulary_name(vocab_size: int) -> str:
    for name, size in VOCABULARIES.items():
        if size == vocab_size:
            return name
    return f"gpt2-{vocab_size}"


# What every checkpoint's metadata has held from the start.
ORIGINAL_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")

PRESETS: dict[str, GPTConfig] = {
    # Seconds on a CPU: for tests and smoke runs. The vocabulary is all of GPT-2's, the largest,
    # so that the tokenizer, checkpoints and exports are exercised at full size.
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
    # The default: nanoGPT's quality-run shape (4 layers × 128) with Llama's network (rotary
    # positions, RMSNorm, SwiGLU, no biases) and GPT-2's first 8,191 tokens: 1.9M parameters,
    # 1.05M of them the embedding. On a CPU the output layer is most of a step, so a narrow
    # model with a small head sees the most text per minute (with all of GPT-2's vocabulary it
    # is 7.3M and trains 3.7x fewer tokens in the same time); it exports to Llama's formats.
    # BENCHMARKS.md has the equal-time runs that chose it.
    "small": GPTConfig(
        vocab_size=VOCABULARIES["gpt2-8k"],
        block_size=128,
        n_layer=4,
        n_head=4,
        n_embd=128,
        bias=False,
        position="rotary",
        norm="rmsnorm",
        activation="swiglu",
    ),
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
