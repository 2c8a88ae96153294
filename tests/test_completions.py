"""/v1/completions in the shapes evaluation clients send (several prompts, token ids, echo,
logprobs, n) and /generate's logprobs, over HTTP on a real server; bad input gets a 422 naming
the field and disturbs nothing else."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from servers import ApiServer, api_server, sse_events, write_checkpoint

from model.tokenizer import get_tokenizer

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ApiServer:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    env = {"CHECKPOINT_DIR": str(root), "MAX_NEW_TOKENS": str(MAX_TOKENS), "MAX_N": "4"}
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as running:
        yield running


@pytest.fixture
def client(server) -> httpx.Client:
    with server.client() as client:
        yield client


def complete(client: httpx.Client, **body: object) -> dict:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_prompt_shape_gets_its_choices_in_order(client) -> None:
    tokenizer = get_tokenizer()
    texts = ["Once upon a time", "The dog ran", "Lily saw a bird"]
    greedy = {"max_tokens": 8, "temperature": 0}
    alone = [complete(client, prompt=text, **greedy)["choices"][0]["text"] for text in texts]

    as_texts = complete(client, prompt=texts, **greedy)
    as_ids = complete(client, prompt=[tokenizer.encode(text) for text in texts], **greedy)
    one_as_ids = complete(client, prompt=tokenizer.encode(texts[1]), **greedy)
    for answer in (as_texts, as_ids):
        assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2]
        assert [choice["text"] for choice in answer["choices"]] == alone
        assert answer["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(t)) for t in texts)
        assert answer["usage"]["completion_tokens"] == 3 * 8
    assert one_as_ids["choices"][0]["text"] == alone[1]

    # n choices per prompt, prompt by prompt.
    two_each = complete(client, prompt=texts[:2], n=2, max_tokens=8, seed=4)
    assert [choice["index"] for choice in two_each["choices"]] == [0, 1, 2, 3]
    assert two_each["usage"]["prompt_tokens"] == as_texts["usage"]["prompt_tokens"] - len(
        tokenizer.encode(texts[2])
    )


def test_echo_returns_the_prompt_then_the_completion_with_every_tokens_logprob(client) -> None:
    tokenizer = get_tokenizer()
    answer = complete(client, prompt="The cat sat", echo=True, logprobs=0, max_tokens=5, seed=1)
    (choice,) = answer["choices"]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith("The cat sat")
    assert len(logprobs["tokens"]) == 3 + 5
    assert logprobs["token_logprobs"][0] is None
    assert all(value <= 0 for value in logprobs["token_logprobs"][1:])
    # Offsets point into the text returned: each token's text starts where its offset says.
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"], strict=True):
        assert choice["text"][offset:].startswith(token)
    # With logprobs=0 an entry holds the token itself only.
    assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])

    # The same prompt scored alone (max_tokens 0) gives the same prompt log-probabilities.
    scored = complete(client, prompt=tokenizer.encode("The cat sat"), echo=True, logprobs=0,
                      max_tokens=0)  # fmt: skip
    only = scored["choices"][0]
    assert only["text"] == "The cat sat"
    assert only["finish_reason"] == "length"
    assert only["logprobs"]["token_logprobs"] == pytest.approx(
        [None, *logprobs["token_logprobs"][1:3]], abs=1e-5
    )
    assert scored["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}


def test_a_streamed_echo_sends_the_scored_prompt_first(client) -> None:
    body = {"prompt": "The cat sat", "echo": True, "logprobs": 1, "max_tokens": 4, "seed": 3}
    whole = complete(client, **body)["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = [data for _, data in sse_events(response)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data)["choices"][0] for data in events[:-1]]
    assert chunks[0]["text"] == "The cat sat"
    assert chunks[0]["logprobs"]["tokens"] == ["The", " cat", " sat"]
    assert "".join(chunk["text"] for chunk in chunks) == whole["text"]
    offsets = [o for chunk in chunks if chunk["logprobs"] for o in chunk["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]


def test_generate_streams_each_tokens_logprob_with_alternatives(client) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 6, "seed": 9, "logprobs": 3}
    whole = client.post("/generate", json={**body, "stream": False}).json()
    assert [score["token_id"] for score in whole["logprobs"]] == whole["token_ids"]
    for score in whole["logprobs"]:
        assert len(score["top"]) == 3
        assert score["top"][0]["logprob"] >= score["logprob"]
        assert [alt["logprob"] for alt in score["top"]] == sorted(
            (alt["logprob"] for alt in score["top"]), reverse=True
        )
    with client.stream("POST", "/generate", json=body) as response:
        pieces = [json.loads(data) for event, data in sse_events(response) if event == "token"]
    streamed = [score for piece in pieces for score in piece["logprobs"]]
    assert streamed == whole["logprobs"]


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"prompt": "Hi", "logprobs": 99}, "logprobs", "MAX_LOGPROBS"),
        ({"prompt": "Hi", "n": 10**6}, "n", "MAX_N"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[1, 2], []]}, "prompt", "at least 1"),
        ({"prompt": [50257]}, "prompt", "outside the vocabulary"),
        ({"prompt": [[5], [-1]]}, "prompt", "greater than or equal to 0"),
        ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens", "echo"),
        ({"prompt": "Hi", "echo": "maybe"}, "echo", "boolean"),
        ({"prompt": "Hi", "model": "no-such-run"}, "model", "/v1/models"),
        ({"prompt": "Hi", "seed": 2**53}, "seed", "9007199254740991"),
        ({"prompt": "Hi " * 300, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt",
         "context"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_naming_the_field(client, body, field, says) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code in (404, 422), response.text
    error = response.json()["error"]
    assert error["param"] == field or error["param"].startswith(field + "."), error
    assert says in error["message"]


def test_bad_requests_leave_a_running_stream_alone(client, server) -> None:
    finals: list[dict] = []

    def stream() -> None:
        body = {"prompt": "Once", "max_new_tokens": MAX_TOKENS, "temperature": 0}
        with server.client() as own, own.stream("POST", "/generate", json=body) as response:
            for event, data in sse_events(response):
                if event == "done":
                    finals.append(json.loads(data))

    worker = threading.Thread(target=stream)
    worker.start()
    for body in ({"prompt": [10**9]}, {"prompt": "x", "n": 99}, {"prompt": [[]]}):
        assert client.post("/v1/completions", json=body).status_code == 422
    worker.join(60)
    assert finals and finals[0]["usage"]["completion_tokens"] == MAX_TOKENS


def test_chat_refuses_what_a_story_model_cannot_read(client) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    for body, field in (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [image]}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs"),
    ):
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"].startswith(field)
