"""Whether a model fits what the service will allocate to serve it: the one rule, checked when
a job is submitted (``contract.store``, by the spec's model) and again before the service loads
any checkpoint (``service.reloader``, by its metadata), and the size of the KV cache it gets
(``service.engine``).

A loaded model costs its weights and its KV cache. The weights are bounded by
MAX_MODEL_PARAMS and its positions by MAX_MODEL_BLOCK_SIZE; the cache gets KV_CACHE_BYTES,
as many rows (stories decoded at once) as fit up to MAX_BATCH_SIZE, so a long or wide model
gets fewer rows rather than gigabytes, and one that cannot have a single row is refused.
"""

from __future__ import annotations

import torch

from contract.settings import Settings
from contract.train import TrainConfig
from model.cache import KVCache
from model.config import GPTConfig
from model.gpt import GPT

# Jobs save their weights in float32 (the trainer's master copy), and so serve from them.
JOB_DTYPE = torch.float32
# The model settings of a job that each bound depends on, for naming the field at fault.
_FIELDS = {
    "block_size": ("model_block_size",),
    "params": ("n_layer", "n_embd"),
    "kv_cache": ("model_block_size", "n_layer", "n_embd"),
}


class ModelTooLarge(ValueError):
    """A model over a serving bound; ``bound`` says which (a key of ``_FIELDS``)."""

    def __init__(self, message: str, bound: str) -> None:
        super().__init__(message)
        self.bound = bound


def parameters(config: GPTConfig) -> int:
    """The model's parameter count, from a model on the meta device (which allocates nothing)."""
    with torch.device("meta"):
        return GPT(config).num_parameters()


def kv_cache_rows(config: GPTConfig, dtype: torch.dtype, settings: Settings) -> int:
    """Rows of the KV cache a loaded ``config`` gets: as many as KV_CACHE_BYTES holds, at most
    MAX_BATCH_SIZE; ModelTooLarge when not even one fits."""
    row = KVCache.row_bytes(config, dtype)
    rows = min(settings.max_batch_size, settings.kv_cache_bytes // row)
    if rows < 1:
        raise ModelTooLarge(
            f"one story's KV cache for this model (n_layer {config.n_layer} × block_size "
            f"{config.block_size} × n_embd {config.n_embd} × 2 × {dtype.itemsize} bytes = "
            f"{row:,} bytes) exceeds this server's KV_CACHE_BYTES of {settings.kv_cache_bytes:,}",
            "kv_cache",
        )
    return rows


def check_model(config: GPTConfig, dtype: torch.dtype, settings: Settings) -> None:
    """Refuse (ModelTooLarge) a model the service would not serve."""
    if config.block_size > settings.max_model_block_size:
        raise ModelTooLarge(
            f"the model's {config.block_size} positions exceed this server's limit of "
            f"{settings.max_model_block_size} (MAX_MODEL_BLOCK_SIZE)",
            "block_size",
        )
    count = parameters(config)
    if count > settings.max_model_params:
        raise ModelTooLarge(
            f"the model's {count:,} parameters (n_layer {config.n_layer}, n_embd "
            f"{config.n_embd}) exceed this server's limit of {settings.max_model_params:,} "
            f"(MAX_MODEL_PARAMS)",
            "params",
        )
    kv_cache_rows(config, dtype, settings)


def job_model_misfit(train: TrainConfig, settings: Settings) -> tuple[str, str] | None:
    """Why the model a job would train could not be served, and the spec's field to blame
    (one the job gave, else its preset); None when it fits."""
    try:
        check_model(train.model(), JOB_DTYPE, settings)
    except ModelTooLarge as error:
        given = [name for name in _FIELDS[error.bound] if getattr(train, name) is not None]
        return str(error), f"train.{given[0] if given else 'preset'}"
    return None
