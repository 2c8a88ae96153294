"""What a training run is asked to do (``TrainConfig``) and what it reports (``TrainProgress``).

TrainConfig is every setting of a run, validated, with a bound on every number: the training part
of a job spec. The CLI builds it from options, the HTTP API and the RQ worker from the job's JSON,
and the trainer stores it beside its checkpoints to resume. It holds no paths (data, run folder,
the checkpoint to fine-tune): those belong to the job.

TrainProgress is the one progress schema: the trainer hands it to its callbacks, a job keeps it
(extended by ``contract.jobs.JobProgress``) in its RQ meta, and the API returns its fields.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model.config import (
    PRESETS,
    VOCABULARIES,
    Activation,
    GPTConfig,
    Norm,
    Position,
    preset,
    vocabulary_name,
    vocabulary_size,
)
from model.sampling import MAX_SEED

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# The settings that say how long a run trains; at most one is given (default: 1000 steps).
LENGTHS = ("max_steps", "max_tokens", "max_minutes")

# Settings whose default changed after runs began saving their config, at the value those runs
# trained with: a saved config that lacks one predates it.
EARLIER_DEFAULTS: dict[str, Any] = {"optimizer": "adamw"}

# TrainConfig's overrides of the preset's network, named as in GPTConfig (None: the preset's).
SHAPE_FIELDS = (
    "n_layer",
    "n_head",
    "n_embd",
    "bias",
    "position",
    "norm",
    "activation",
    "qk_norm",
    "tie_embeddings",
    "pad_vocab",
    "vocabulary",
)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The model: a preset, plus the overrides that change its shape or regularisation.
    preset: str = Field("small", description=f"model preset: {', '.join(PRESETS)}")
    model_block_size: int | None = Field(
        None, ge=8, le=8192, description="override the preset's positions (context length)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout while training")
    # Shape and architecture: each None keeps the preset's value (see model.config.GPTConfig).
    n_layer: int | None = Field(
        None, ge=1, le=64, description="transformer blocks (default: the preset's)"
    )
    n_head: int | None = Field(
        None, ge=1, le=64, description="attention heads per block (default: the preset's)"
    )
    n_embd: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="width: embedding size (a multiple of n_head) (default: the preset's)",
    )
    bias: bool | None = Field(
        None, description="biases in the linear layers and norms (default: the preset's)"
    )
    position: Position | None = Field(
        None,
        description="positions: learned (GPT-2's table) or rotary (RoPE) (default: the preset's)",
    )
    norm: Norm | None = Field(
        None, description="normalisation: layernorm or rmsnorm (default: the preset's)"
    )
    activation: Activation | None = Field(
        None,
        description="the MLP's nonlinearity: gelu, relu2 (ReLU²) or swiglu (default: the preset's)",
    )
    qk_norm: bool | None = Field(
        None, description="normalise queries and keys per head (default: the preset's)"
    )
    tie_embeddings: bool | None = Field(
        None,
        description="the output head shares the token embedding's weights (default: the preset's)",
    )
    vocabulary: str | None = Field(
        None,
        description="the tokenizer: gpt2 (all of GPT-2's 50,257 tokens) or GPT-2's first merges, "
        f"{', '.join(name for name in VOCABULARIES if name != 'gpt2')} or gpt2-<size> "
        "(default: the preset's)",
    )
    pad_vocab: bool | None = Field(
        None,
        description="pad the vocabulary to a multiple of 64 rows, for GPU matmuls "
        "(default: the preset's)",
    )

    # Batches: tokens per optimizer step = batch_size × block_size × grad_accum × processes.
    batch_size: int = Field(16, ge=1, le=4096, description="windows per micro-batch")
    block_size: int | None = Field(
        None, ge=2, le=8192, description="tokens per window (default: the model's positions)"
    )
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")

    # Optimizer and schedule (per optimizer step, never per micro-batch).
    # The defaults are the recipe measured best for the default preset (BENCHMARKS.md): Muon for
    # the blocks and a high AdamW rate for the tied embedding, which is most of a small model.
    lr: float = Field(
        6e-3, gt=0.0, le=1.0, description="peak learning rate (AdamW's: with muon, its share)"
    )
    min_lr: float = Field(6e-4, ge=0.0, le=1.0, description="learning rate at the end of decay")
    warmup_steps: int = Field(20, ge=0, le=10_000_000, description="linear warm-up steps")
    max_steps: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="optimizer steps (1000 unless max_tokens or max_minutes is given)",
    )
    max_tokens: int | None = Field(
        None, ge=1, le=10**13, description="train for this many tokens instead of max_steps"
    )
    lr_decay_steps: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="steps the warm-up and cosine span (default: all); past them, min_lr",
    )
    # A wall-clock budget: training (set-up excluded; evaluations and checkpoints included)
    # runs until max_minutes have passed since it started, then ends with an eval and a
    # checkpoint; a resumed run trains what is left of it. The schedule runs on the clock: the
    # warm-up stays warmup_steps steps, then the cosine decays to min_lr over the time left
    # (progress = the fraction of the budget after warm-up that has passed), unless
    # lr_decay_steps is given. Evaluations stay every eval_interval steps.
    max_minutes: float | None = Field(
        None,
        gt=0.0,
        le=10_000_000,
        description="train for this many minutes of wall-clock time instead of max_steps "
        "(set-up excluded, evals and checkpoints included; the cosine runs on the clock)",
    )
    lr_decay_minutes: float | None = Field(
        None,
        gt=0.0,
        le=10_000_000,
        description="minutes the warm-up and cosine span, on the clock (default with "
        "max_minutes: all); past them, min_lr",
    )
    weight_decay: float = Field(0.1, ge=0.0, le=1.0, description="AdamW decay, ≥2-D weights")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW β1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW β2")
    grad_clip: float = Field(1.0, ge=0.0, le=1e6, description="max gradient norm (0 = off)")
    optimizer: Literal["adamw", "muon"] = Field(
        "muon",
        description="adamw, or muon: Muon for the blocks' 2-D weights (attention, MLP), AdamW "
        "(lr, weight_decay, betas) for embeddings, head, norms and biases",
    )
    # Muon's own units: its update is orthogonalised and scaled by sqrt(max(1, rows/cols)) as in
    # Keller Jordan's reference (worker.optim), whose defaults these are; both optimizers follow
    # the one schedule, each from its own peak (muon_lr decays to muon_lr × min_lr / lr).
    muon_lr: float = Field(0.02, gt=0.0, le=10.0, description="Muon's peak learning rate")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's (Nesterov) momentum")
    # Muon decays by lr × weight decay per step, and its lr is ~30× AdamW's: 0.01, not 0.1.
    muon_weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="Muon's weight decay")

    # Evaluation, logging and checkpoints.
    eval_interval: int = Field(200, ge=1, le=100_000_000, description="steps between evals")
    eval_iters: int = Field(20, ge=1, le=100_000, description="batches per eval and split")
    log_interval: int = Field(10, ge=1, le=100_000_000, description="steps between log lines")
    checkpoint_interval: int = Field(
        1000, ge=0, le=100_000_000, description="steps between periodic checkpoints (0 = end)"
    )
    keep_checkpoints: int = Field(
        3,
        ge=1,
        le=1_000_000,
        description="periodic checkpoints kept, newest first; older ones are deleted (best stays)",
    )

    # Hardware and reproducibility.
    dtype: Dtype = Field(
        "auto", description="auto: bfloat16 on GPUs with it, float16 on older GPUs, CPU float32"
    )
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(
        1337, ge=0, le=MAX_SEED, description="seed for weights and batches (JSON-safe: < 2^53)"
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N"
    )

    @field_validator("vocabulary")
    @classmethod
    def _known_vocabulary(cls, name: str | None) -> str | None:
        """The vocabulary's own name (gpt2-8192 is gpt2-8k), as its checkpoints report it, so a
        fine-tune or resume that names it either way asks for the same shape; a ValueError that
        lists the names for an unknown one."""
        return None if name is None else vocabulary_name(vocabulary_size(name))

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        lengths = [name for name in LENGTHS if getattr(self, name) is not None]
        if len(lengths) > 1:
            raise ValueError(
                f"give one of max_steps, max_tokens or max_minutes, not {' and '.join(lengths)}"
            )
        if self.lr_decay_steps is not None and self.lr_decay_minutes is not None:
            raise ValueError("give lr_decay_steps or lr_decay_minutes, not both")
        try:
            shape = self.model()
        except ValueError as error:  # a combination GPTConfig refuses, e.g. n_embd % n_head
            given = ", ".join(f"{k}={v}" for k, v in self.shape_overrides().items())
            problem = str(error).removeprefix("GPTConfig.")
            raise ValueError(f"preset {self.preset!r} with {given}: {problem}") from None
        if self.block_size is not None and self.block_size > shape.block_size:
            raise ValueError(
                f"block_size {self.block_size} exceeds the model's {shape.block_size} "
                f"positions; raise them with model_block_size"
            )
        return self

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """The config a saved run (its training state or checkpoint) trained with: a setting
        added since takes the value that reproduces what the run did, not today's default."""
        return cls(**{**EARLIER_DEFAULTS, **saved})

    def shape_overrides(self) -> dict[str, Any]:
        """The preset's shape and architecture settings this config changes (those given)."""
        overrides = {name: getattr(self, name) for name in SHAPE_FIELDS if name != "vocabulary"}
        if self.vocabulary is not None:
            overrides["vocab_size"] = vocabulary_size(self.vocabulary)
        if self.model_block_size is not None:
            overrides["block_size"] = self.model_block_size
        return {name: value for name, value in overrides.items() if value is not None}

    def model(self) -> GPTConfig:
        """The network this config trains from scratch: the preset, with the overrides given."""
        return preset(self.preset, dropout=self.dropout, **self.shape_overrides())

    def decay_seconds(self) -> float | None:
        """Seconds of training the warm-up and cosine span when the schedule runs on the clock
        (lr_decay_minutes, or max_minutes without lr_decay_steps); None when it counts steps."""
        if self.lr_decay_minutes is not None:
            return self.lr_decay_minutes * 60
        if self.max_minutes is not None and self.lr_decay_steps is None:
            return self.max_minutes * 60
        return None

    def tokens_per_step(self, block_size: int, world_size: int = 1) -> int:
        return self.batch_size * block_size * self.grad_accum * world_size

    def total_steps(self, block_size: int, world_size: int = 1) -> int | None:
        """Optimizer steps the run takes; None under max_minutes (the clock decides)."""
        if self.max_minutes is not None:
            return None
        if self.max_tokens is not None:
            return math.ceil(self.max_tokens / self.tokens_per_step(block_size, world_size))
        return self.max_steps if self.max_steps is not None else 1000


class TrainProgress(BaseModel):
    """A run's progress, reported every ``log_interval`` steps and at every evaluation and
    checkpoint (by rank 0 only). Between reports nothing leaves the accelerator: the loss stays
    on the device and the rates are measured over the whole interval."""

    model_config = ConfigDict(frozen=True)

    step: int = Field(0, description="optimizer steps done")
    max_steps: int | None = Field(
        None,
        description="the run's last step; under max_minutes an estimate while it runs (steps "
        "done / time elapsed × budget), None before the first report",
    )
    train_loss: float | None = Field(
        None, description="mean training loss over the steps since the previous report"
    )
    val_loss: float | None = Field(None, description="the latest evaluation's")
    val_bits_per_byte: float | None = Field(
        None,
        description="the latest evaluation's loss in bits per byte of text: unlike the loss, "
        "comparable between runs of different vocabularies",
    )
    lr: float | None = Field(None, description="the learning rate of the last step")
    tokens_seen: int = 0
    tokens_per_s: float | None = None
    eta_s: float | None = Field(
        None, description="seconds left at the current rate (under max_minutes: of the budget)"
    )
    last_checkpoint: str | None = Field(
        None,
        description="the checkpoint saved last: its metadata path to the trainer, "
        "<run>/<checkpoint name> (relative to CHECKPOINT_DIR) in a job",
    )


def describe_error(error: ValidationError) -> str:
    """A pydantic error as one line a user can act on: ``field: problem; ...``."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
