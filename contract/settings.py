"""Every setting of the worker and the service, read from the environment in one place.

Variable names are the field names in upper case (``CHECKPOINT_DIR``, ``REDIS_URL``,
``MAX_BATCH_SIZE``...); the README's configuration table lists them all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_API_KEY_LENGTH = 16


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

    def redact(self, message: str) -> str:
        """``message`` with the names CHECKPOINT_DIR and DATA_DIR for those folders' absolute
        paths, so what a client reads (an error, a job's message) tells nothing of the server's
        file system. Only whole paths are replaced (not ``/data`` inside ``https://host/data``),
        the longer first, in case one folder lies inside the other."""
        folders = {"CHECKPOINT_DIR": self.checkpoint_dir, "DATA_DIR": self.data_dir}
        spellings = [
            (str(spelled), name)
            for name, folder in folders.items()
            for spelled in {folder.absolute(), folder.resolve()}
        ]
        for spelled, name in sorted(spellings, key=lambda pair: -len(pair[0])):
            message = re.sub(rf"(?<![\w.:/-]){re.escape(spelled)}(?![\w.-])", name, message)
        return message

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
    min_free_disk_bytes: int = Field(
        1 << 30,
        ge=0,
        le=1 << 50,
        description="free space CHECKPOINT_DIR must keep: a job does not start below it, and "
        "fails before a checkpoint that would go below it (the last whole one stays)",
    )

    # data.source URLs: a client names them, the worker fetches them (worker.data.sources).
    allowed_data_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        max_length=256,
        description="hosts (`name` or `name:port`, comma-separated) that http(s) data sources may "
        "reach though they are not public addresses (loopback, private, link-local...); the "
        "rest of such addresses are refused",
    )
    max_download_bytes: int = Field(
        8 << 30,
        ge=1024,
        le=1 << 44,
        description="an http(s) data source larger than this fails its job (hub:v2's train file "
        "is 2.2 GB)",
    )
    download_timeout_s: float = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="an http(s) data source must arrive within this"
    )

    @field_validator("allowed_data_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(host.strip().lower() for host in value.split(",") if host.strip())
        return value

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
        description="when set, generation, /train-jobs, /datasets, /admin and /metrics need "
        "`Bearer <key>` (16 characters at least); unset, /train-jobs, /datasets and /admin "
        "answer loopback clients only",
    )

    @field_validator("api_key")
    @classmethod
    def _key_is_long(cls, key: SecretStr | None) -> SecretStr | None:
        # The key is all that guards training from the network: too short, it can be guessed.
        if key is not None and len(key.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"API_KEY must be at least {MIN_API_KEY_LENGTH} characters; make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return key

    public_status: bool = Field(
        False,
        description="with API_KEY set, let clients without the key read /metrics and the run "
        "names in /ready",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a request body must arrive within this long of its headers, else 408 "
        "(slow clients cannot hold a connection)",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="open connections `slm serve` holds at once; a request beyond them gets 503",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a request's headers must arrive within this long of its connection opening "
        "(or of the answer before it), else 408 and the connection closes (slow loris)",
    )
    stream_send_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a stream whose client reads nothing for this long is dropped and its story "
        "cancelled, freeing its slot",
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
    max_prompt_chars: int = Field(
        65_536,
        ge=1,
        le=100_000_000,
        description="longer prompt texts get 422 before they are tokenized, so no request makes "
        "the server encode a megabyte it will refuse (English runs ~4 characters a token)",
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
    max_stories_per_request: int = Field(
        32,
        ge=1,
        le=100_000,
        description="most stories (prompts × n) one request may start, so one client cannot "
        "take every slot of the batch",
    )
    max_request_tokens: int = Field(
        65_536,
        ge=1,
        le=100_000_000,
        description="most tokens one request may cost: over its stories, prompt tokens plus "
        "the tokens to generate",
    )
    max_loaded_models: int = Field(
        4, ge=1, le=256, description="runs kept in memory; the least recently used goes first"
    )
    # The largest model a job may ask for and the service will load (contract.capacity).
    max_model_block_size: int = Field(
        2048, ge=8, le=1 << 20, description="most positions (block_size) of a model"
    )
    max_model_params: int = Field(
        1_000_000_000, ge=1, le=1 << 44, description="most parameters of a model"
    )
    kv_cache_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        le=1 << 44,
        description="the KV cache of one loaded model: rows = min(MAX_BATCH_SIZE, this / bytes "
        "per row), a row being n_layer × block_size × n_embd × 2 × bytes per number; a model "
        "that cannot have one row is refused",
    )
    decode_threads: int = Field(
        0, ge=0, le=1024, description="torch threads for decoding; 0: every core"
    )
    compile_decode: bool = Field(
        True,
        description="compile the decode step per batch bucket in the background (torch.compile; "
        "on CUDA captured in CUDA graphs); requests are served eager until it is ready. Off: "
        "every step eager at the shapes it needs",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="deadline per generation")

    # --- the service: hot reload ---
    reload_poll_s: float = Field(5.0, gt=0, description="manifest poll interval (fallback)")
