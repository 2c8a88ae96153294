"""The official `openai` SDK, unchanged, against /v1 on a real server."""

from __future__ import annotations

import openai
import pytest
from servers import ApiServer, api_server, write_checkpoint

KEY = "sdk-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ApiServer:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    env = {"CHECKPOINT_DIR": str(root), "API_KEY": KEY, "MAX_NEW_TOKENS": "256"}
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, timeout=30, max_retries=0)


def test_models_lists_the_loaded_version(client) -> None:
    assert [model.id for model in client.models.list()] == ["run-a/step-00000001"]


def test_a_completion_reports_text_usage_and_version(client) -> None:
    completion = client.completions.create(
        model="run-a/step-00000001", prompt="Once upon a time", max_tokens=20, temperature=0
    )
    (choice,) = completion.choices
    assert choice.text
    assert choice.finish_reason == "length"
    assert completion.model == "run-a/step-00000001"
    assert completion.usage.completion_tokens == 20
    assert completion.usage.prompt_tokens == 4


def test_streamed_chunks_join_to_the_same_completion(client) -> None:
    request = {"model": "any", "prompt": "The sun", "max_tokens": 30, "temperature": 0.7, "seed": 5}
    whole = client.completions.create(**request)
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30
    assert {chunk.model for chunk in chunks} == {"run-a/step-00000001"}


def test_sdk_errors_carry_the_status_and_the_field(server, client) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.completions.create(model="any", prompt="Hi", temperature=-1)
    assert invalid.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.completions.create(model="any", prompt="Hi", max_tokens=257)
    assert too_long.value.body["param"] == "max_tokens"
    anonymous = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_presence_and_frequency_penalties_and_min_p_change_a_seeded_completion(client) -> None:
    request = {"model": "any", "prompt": "Once upon a time", "max_tokens": 40, "seed": 3}
    plain = client.completions.create(**request).choices[0].text
    assert client.completions.create(**request).choices[0].text == plain  # seeded: replayable
    for knob in (
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"extra_body": {"min_p": 0.5}},  # an extra, as vLLM and llama.cpp's server take it
    ):
        changed = client.completions.create(**request, **knob).choices[0].text
        assert changed != plain, knob
