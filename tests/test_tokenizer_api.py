"""/tokenize, /detokenize and /tokenizer_info on a real server: vLLM's shapes, each run's own
vocabulary (GPT-2's for the default run, GPT-2's first merges for another), and lm-eval's remote
tokenizer reading them as it does for ``local-completions``."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
from servers import ApiServer, api_server, write_checkpoint

from model.tokenizer import Tokenizer, get_tokenizer

KEY = "tokenizer-test-key"
CUT = 1024  # GPT-2's 256 bytes, its first 767 merges and <|endoftext|>
TEXTS = [
    "Once upon a time, there was a little dog named Max.",
    "  spaces, tabs\tand\nnew lines  ",
    "Émoji 🙂 and 漢字 too",
    "",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ApiServer]:
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(checkpoints / "cut", vocab_size=CUT)
    write_checkpoint(checkpoints / "full")  # saved last: the default run
    env = {"CHECKPOINT_DIR": str(checkpoints), "API_KEY": KEY}
    with api_server(env, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture
def client(server: ApiServer) -> Iterator[httpx.Client]:
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield http


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_gives_gpt2_ids_and_detokenize_gives_the_text_back(
    client: httpx.Client, tokenizer: Tokenizer, text: str
) -> None:
    answer = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert answer.status_code == 200, answer.text
    tokens = answer.json()["tokens"]
    assert tokens == tokenizer.encode(text)
    assert answer.json()["count"] == len(tokens)
    back = client.post("/detokenize", json={"tokens": tokens})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": text}


def test_end_of_text_is_one_token_as_in_hugging_faces_gpt2(client: httpx.Client) -> None:
    answer = client.post("/tokenize", json={"prompt": "The end.<|endoftext|>Once"}).json()
    assert answer["tokens"][-2:] == [50256, 7454]
    assert client.post("/detokenize", json={"tokens": [50256]}).json() == {
        "prompt": "<|endoftext|>"
    }


def test_half_a_character_detokenizes_to_the_replacement_character(
    client: httpx.Client, tokenizer: Tokenizer
) -> None:
    first, *_ = tokenizer.encode("🙂")  # its four UTF-8 bytes span several tokens
    assert client.post("/detokenize", json={"tokens": [first]}).json()["prompt"] == "\ufffd"


def test_tokenizer_info_names_gpt2s_special_tokens(client: httpx.Client) -> None:
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "GPT2Tokenizer"
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["vocab_size"] == 50257 and info["eos_token_id"] == 50256
    assert info["vocabulary"] == "gpt2"


@pytest.mark.parametrize("text", TEXTS)
def test_a_run_with_fewer_merges_tokenizes_with_its_own_vocabulary(
    client: httpx.Client, text: str
) -> None:
    cut = get_tokenizer(CUT)
    answer = client.post("/tokenize", json={"model": "cut", "prompt": text + "<|endoftext|>"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokens"] == [*cut.encode(text), CUT - 1]
    back = client.post("/detokenize", json={"model": "cut", "tokens": cut.encode(text)})
    assert back.json() == {"prompt": text}
    info = client.get("/tokenizer_info", params={"model": "cut"}).json()
    assert (info["vocabulary"], info["vocab_size"], info["eos_token_id"]) == (
        "gpt2-1024",
        CUT,
        CUT - 1,
    )


def test_an_id_outside_the_runs_vocabulary_gets_422_and_an_unknown_run_404(
    client: httpx.Client,
) -> None:
    answer = client.post("/detokenize", json={"model": "cut", "tokens": [5, CUT]})
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "tokens.1"
    assert "gpt2-1024" in answer.json()["error"]["message"]
    assert client.post("/detokenize", json={"model": "full", "tokens": [5, CUT]}).status_code == 200
    missing = client.post("/tokenize", json={"model": "nothing-here", "prompt": "Hi"})
    assert missing.status_code == 404, missing.text


@pytest.mark.parametrize(
    ("tokens", "field"),
    [([464, 50257], "tokens.1"), ([-1], "tokens.0"), ([1.5], "tokens.0"), ("464", "tokens")],
)
def test_ids_outside_the_vocabulary_get_422_naming_the_field(
    client: httpx.Client, tokens: object, field: str
) -> None:
    answer = client.post("/detokenize", json={"tokens": tokens})
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == field


def test_a_tokenize_without_a_prompt_gets_422(client: httpx.Client) -> None:
    answer = client.post("/tokenize", json={"text": "Hi"})
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/tokenize", {"prompt": "Hi"}), ("POST", "/detokenize", {"tokens": [1]}),
     ("GET", "/tokenizer_info", None), ("POST", "/runs/cut/tokenize", {"prompt": "Hi"}),
     ("POST", "/runs/cut/v1/completions", {"prompt": "Hi"})],
)  # fmt: skip
def test_the_api_key_is_needed_when_one_is_set(
    server: ApiServer, method: str, path: str, body: dict | None
) -> None:
    with server.client() as anonymous:
        assert anonymous.request(method, path, json=body).status_code == 401


def test_lm_evals_remote_tokenizer_reads_these_endpoints(
    server: ApiServer, tokenizer: Tokenizer
) -> None:
    completions = server.base_url + "/v1/completions"  # lm-eval finds the rest beside it
    assert check_remote_tokenizer_support(completions, auth_token=KEY)
    remote = RemoteTokenizer(completions, auth_token=KEY)
    assert remote.eos_token_id == remote.bos_token_id == tokenizer.eot_id
    assert remote.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    assert remote.batch_decode([tokenizer.encode(text) for text in TEXTS]) == TEXTS


def test_a_runs_own_base_url_gives_lm_eval_that_runs_tokenizer_and_completions(
    server: ApiServer, client: httpx.Client
) -> None:
    cut = get_tokenizer(CUT)
    completions = server.base_url + "/runs/cut/v1/completions"  # not the default run
    remote = RemoteTokenizer(completions, auth_token=KEY)
    assert remote.eos_token_id == cut.eot_id == CUT - 1
    assert remote.encode(TEXTS[0]) == cut.encode(TEXTS[0])
    assert remote.encode(TEXTS[0]) != get_tokenizer().encode(TEXTS[0])
    assert remote.decode(cut.encode(TEXTS[2])) == TEXTS[2]
    scored = client.post(
        "/runs/cut/v1/completions",
        json={"prompt": [cut.encode(TEXTS[0])], "echo": True, "max_tokens": 0, "logprobs": 1},
    )
    assert scored.status_code == 200, scored.text
    assert scored.json()["model"].startswith("cut/")
    assert "".join(scored.json()["choices"][0]["logprobs"]["tokens"]) == TEXTS[0]


@pytest.mark.parametrize(
    ("method", "path", "body", "params"),
    [("POST", "/runs/cut/tokenize", {"prompt": "Hi", "model": "full"}, None),
     ("POST", "/runs/cut/v1/completions", {"prompt": "Hi", "model": "full"}, None),
     ("GET", "/runs/cut/tokenizer_info", None, {"model": "full"})],
)  # fmt: skip
def test_a_runs_base_url_refuses_a_request_that_names_another_run(
    client: httpx.Client, method: str, path: str, body: dict | None, params: dict | None
) -> None:
    answer = client.request(method, path, json=body, params=params)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == "model"
    assert "'cut'" in answer.json()["error"]["message"]


def test_a_runs_base_url_takes_its_versions_and_not_an_unknown_run(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    version = cards["cut"]["version"]  # cut/<checkpoint>
    answer = client.post("/runs/cut/tokenize", json={"prompt": TEXTS[0], "model": version})
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokens"] == get_tokenizer(CUT).encode(TEXTS[0])
    unknown = client.get("/runs/nobody/tokenizer_info")
    assert unknown.status_code == 404, unknown.text
