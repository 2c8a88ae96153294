"""The official `openai` SDK, unchanged, against /v1 on a real server."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from servers import ApiServer, api_server, write_checkpoint

KEY = "sdk-key-for-tests"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    return root


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory) -> ApiServer:
    root = checkpoints
    env = {"CHECKPOINT_DIR": str(root), "API_KEY": KEY, "MAX_NEW_TOKENS": "256"}
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, timeout=30, max_retries=0)


def test_models_lists_the_runs_by_name(client) -> None:
    (card,) = client.models.list()
    assert card.id == "run-a"
    assert card.model_extra["version"] == "run-a/step-00000001"


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
    request = {
        "model": "run-a",
        "prompt": "The sun",
        "max_tokens": 30,
        "temperature": 0.7,
        "seed": 5,
    }
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
        client.completions.create(model="run-a", prompt="Hi", temperature=-1)
    assert invalid.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.completions.create(model="run-a", prompt="Hi", max_tokens=257)
    assert too_long.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    assert unknown.value.body["param"] == "model"
    assert unknown.value.body["code"] == "model_not_found"
    anonymous = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_presence_and_frequency_penalties_and_min_p_change_a_seeded_completion(client) -> None:
    request = {"model": "run-a", "prompt": "Once upon a time", "max_tokens": 40, "seed": 3}
    plain = client.completions.create(**request).choices[0].text
    assert client.completions.create(**request).choices[0].text == plain  # seeded: replayable
    for knob in (
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"extra_body": {"min_p": 0.5}},  # an extra, as vLLM and llama.cpp's server take it
    ):
        changed = client.completions.create(**request, **knob).choices[0].text
        assert changed != plain, knob


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(checkpoints, client) -> None:
    """What lm-eval's local-completions sends for a loglikelihood: token ids, echo, max_tokens 0,
    logprobs. The prompt's log-probabilities are the model's own (compared with a plain forward
    of the same checkpoint)."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    ids = tokenizer.encode("Once upon a time, there was a little dog named Max.")
    completion = client.completions.create(
        model="run-a", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    (choice,) = completion.choices
    assert choice.text == tokenizer.decode(ids)
    assert choice.logprobs.tokens == [tokenizer.decode([token]) for token in ids]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.text_offset[:3] == [0, 4, 9]  # "Once", " upon", " a"
    assert completion.usage.prompt_tokens == len(ids)
    assert completion.usage.completion_tokens == 0

    model, _ = load_checkpoint(checkpoints / "run-a")
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    expected = torch.log_softmax(logits[0].double(), dim=-1)
    for position, (logprob, top) in enumerate(
        zip(choice.logprobs.token_logprobs[1:], choice.logprobs.top_logprobs[1:], strict=True)
    ):
        assert logprob == pytest.approx(expected[position, ids[position + 1]].item(), abs=1e-4)
        best = expected[position].topk(2)
        # The two likeliest tokens, plus the prompt's own where it is not one of them.
        assert len(top) in (2, 3)
        for token, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            assert top[tokenizer.decode([token])] == pytest.approx(value, abs=1e-4)


def test_n_completions_each_with_a_seed_derived_from_the_request(client) -> None:
    request = {"model": "run-a", "prompt": "Once upon a time", "max_tokens": 24, "seed": 11}
    request["logprobs"] = 0  # the tokens of each choice, to count them
    three = client.completions.create(**request, n=3, temperature=1.0)
    texts = [choice.text for choice in three.choices]
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert len(set(texts)) == 3  # each its own draw
    assert client.completions.create(**request, n=3, temperature=1.0).choices[2].text == texts[2]
    # The first of n is the request's own seed: the same story as n=1.
    assert client.completions.create(**request, temperature=1.0).choices[0].text == texts[0]
    assert three.usage.prompt_tokens == 4  # the prompt counts once
    counts = [len(choice.logprobs.tokens) for choice in three.choices]
    assert three.usage.completion_tokens == sum(counts) > 24


def test_generated_logprobs_streamed_match_the_whole_answer(client) -> None:
    request = {"model": "run-a", "prompt": "The sun", "max_tokens": 12, "seed": 2, "logprobs": 1}
    whole = client.completions.create(**request).choices[0]
    assert len(whole.logprobs.tokens) == 12
    assert "".join(whole.logprobs.tokens) == whole.text
    assert all(value <= 0 for value in whole.logprobs.token_logprobs)
    chunks = list(client.completions.create(**request, stream=True))
    streamed = [choice.logprobs for chunk in chunks for choice in chunk.choices if choice.logprobs]
    assert [t for logprobs in streamed for t in logprobs.tokens] == whole.logprobs.tokens
    assert [o for logprobs in streamed for o in logprobs.text_offset] == whole.logprobs.text_offset
    values = [v for logprobs in streamed for v in logprobs.token_logprobs]
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)


def test_chat_completions_continue_the_messages_text(client) -> None:
    messages = [
        {"role": "system", "content": "Once upon a time"},
        {"role": "user", "content": [{"type": "text", "text": "there was a cat."}]},
    ]
    chat = client.chat.completions.create(
        model="run-a", messages=messages, max_tokens=15, temperature=0, logprobs=True,
        top_logprobs=2, n=2,
    )  # fmt: skip
    plain = client.completions.create(
        model="run-a", prompt="Once upon a time\nthere was a cat.", max_tokens=15, temperature=0
    )
    assert [choice.message.content for choice in chat.choices] == [plain.choices[0].text] * 2
    assert chat.choices[0].message.role == "assistant"
    content = chat.choices[0].logprobs.content
    assert len(content) == 15
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    streamed = list(
        client.chat.completions.create(
            model="run-a", messages=messages, max_tokens=15, temperature=0, stream=True
        )
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
