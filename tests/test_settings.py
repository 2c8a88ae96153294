"""Settings from the environment: what an operator's typos and empty variables turn into."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contract.settings import Settings


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # `API_KEY=` in a compose file or .env must not become a key no client can present.
    monkeypatch.setenv("API_KEY", "")
    monkeypatch.setenv("REDIS_URL", "")
    settings = Settings()
    assert settings.api_key is None and settings.redis_url is None


def test_variables_are_read_by_their_upper_case_names(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "s3cret-of-16-chars"
    monkeypatch.setenv("API_KEY", key)
    monkeypatch.setenv("MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CHECKPOINT_DIR", "/srv/runs")
    settings = Settings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == key
    assert settings.max_batch_size == 8 and str(settings.checkpoint_dir) == "/srv/runs"


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BATCH_SIZE", "lots")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings()


def test_a_heartbeat_slower_than_the_abandon_bound_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOB_HEARTBEAT_S", "30")
    monkeypatch.setenv("JOB_ABANDONED_AFTER_S", "20")
    with pytest.raises(ValidationError, match="must exceed JOB_HEARTBEAT_S"):
        Settings()


def test_an_api_key_shorter_than_16_characters_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Training from the network is guarded by the key alone: a short one could be guessed.
    monkeypatch.setenv("API_KEY", "fifteen-chars!!")
    with pytest.raises(ValidationError, match="API_KEY must be at least 16 characters"):
        Settings()


def test_redact_names_the_folders_by_their_settings_and_leaves_other_text_alone() -> None:
    settings = Settings(checkpoint_dir="/srv/slm/runs", data_dir="/data")
    message = "no /srv/slm/runs/tales/step-1.json; /data, and https://example.com/data/x.txt"
    assert settings.redact(message) == (
        "no CHECKPOINT_DIR/tales/step-1.json; DATA_DIR, and https://example.com/data/x.txt"
    )
