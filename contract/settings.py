"""Every setting of the worker and the service, read from the environment in one place.

Variable names are the field names in upper case (``CHECKPOINT_DIR``, ``REDIS_URL``,
``MAX_BATCH_SIZE``...); the README's configuration table lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True)

    # --- shared by the worker and the service ---
    checkpoint_dir: Path = Field(Path("checkpoints"), description="one folder per run")
    data_dir: Path = Field(Path("data"), description="prepared datasets, one folder each")
    redis_url: str | None = Field(
        None,
        description="redis:// or unix:// URL; unset: `slm worker`/`slm up` start an embedded "
        "Redis, `slm serve` runs without train jobs and polls for checkpoints",
    )
    queue_name: str = Field("slm-train", pattern=r"^[A-Za-z0-9_-]+$", description="RQ queue")
    job_retention_s: int = Field(
        30 * 24 * 3600,
        ge=3600,
        le=365 * 24 * 3600,
        description="how long finished, stopped, failed and cancelled train jobs stay listed",
    )

    # --- the worker ---
    job_timeout_s: int = Field(
        7 * 24 * 3600, ge=60, description="RQ job timeout: the longest a training job may run"
    )
    job_heartbeat_s: int = Field(
        10, ge=1, le=300, description="seconds between a busy worker's heartbeats"
    )
    job_abandoned_after_s: int = Field(
        30,
        ge=2,
        le=3600,
        description="a started job whose worker sent no heartbeat for this long is abandoned "
        "(must exceed JOB_HEARTBEAT_S)",
    )

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> Settings:
        if self.job_abandoned_after_s <= self.job_heartbeat_s:
            raise ValueError(
                f"JOB_ABANDONED_AFTER_S ({self.job_abandoned_after_s}) must exceed "
                f"JOB_HEARTBEAT_S ({self.job_heartbeat_s}), or live jobs would look abandoned"
            )
        return self

    # --- the service: HTTP ---
    api_key: SecretStr | None = Field(
        None,
        description="when set, /generate, /v1 and /train-jobs need `Bearer <key>`; "
        "admin routes always need it",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a request body must arrive within this long of its headers, else 408 "
        "(slow clients cannot hold a connection)",
    )

    # --- the service: the engine ---
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    quantization: Literal["none", "int8"] = Field("none", description="int8: CPU only")
    max_batch_size: int = Field(64, ge=1, le=1024, description="sequences decoded together")
    max_waiting: int = Field(256, ge=0, le=100_000, description="queued requests before 429")
    max_new_tokens: int = Field(1024, ge=1, le=100_000, description="cap per request")
    max_prompt_tokens: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="longer prompts get 422 (the model keeps the last "
        "block_size tokens of shorter ones)",
    )
    prefill_tokens: int = Field(
        256,
        ge=16,
        le=65_536,
        description="tokens (prompts × padded length) in one prefill forward: arrivals join "
        "together, a longer prompt is encoded in chunks between decode steps",
    )
    max_stop_strings: int = Field(8, ge=0, le=64)
    max_logprobs: int = Field(
        5, ge=0, le=100, description="most alternatives per token in `logprobs` (OpenAI's cap)"
    )
    max_n: int = Field(16, ge=1, le=1024, description="most completions per prompt (`n`)")
    max_loaded_models: int = Field(
        4, ge=1, le=256, description="runs kept in memory; the least recently used goes first"
    )
    decode_threads: int = Field(
        0, ge=0, le=1024, description="torch threads for decoding; 0: every core"
    )
    request_timeout_s: float = Field(300.0, gt=0, description="deadline per generation")

    # --- the service: hot reload ---
    reload_poll_s: float = Field(5.0, gt=0, description="manifest poll interval (fallback)")
