"""Schemathesis against the service's own OpenAPI schema, over HTTP to a real uvicorn server.

Every operation the schema lists is fuzzed with valid (positive) and invalid (negative) requests,
with the API key and without it. Checks: no 5xx, and every response matches the schema (status
code documented, content type documented, JSON body valid against its model). The server has a
checkpoint (generation works) and a Redis (train-job routes are live); no worker consumes its
queue, so POST /train-jobs only queues jobs, never trains.

Bounded: ``MAX_EXAMPLES`` per operation and mode, no per-example deadline (the server, not
hypothesis, is what is being timed), a short read timeout on every call. Rerun with more
examples: ``FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from servers import ApiServer, api_server, write_checkpoint

from service.app import create_app

KEY = "fuzz-key-for-tests"
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Taken from the app itself at collection time, so a new route is fuzzed without editing this.
SCHEMA = create_app().openapi()
OPERATIONS = [(method.upper(), path) for path, item in SCHEMA["paths"].items() for method in item]
# Negative data needs something to break: a body or a constrained parameter. An operation with
# neither (GET /health, GET /train-jobs/{job_id}: any string is a valid id) has no invalid input.
TAKES_INPUT = {
    (method.upper(), path)
    for path, item in SCHEMA["paths"].items()
    for method, operation in item.items()
    if "requestBody" in operation
    or any(parameter["in"] == "query" for parameter in operation.get("parameters", []))
}
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path}-{mode.value}")
    for method, path in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or (method, path) in TAKES_INPUT
]


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_url: str) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    env = {
        "CHECKPOINT_DIR": str(root),
        "API_KEY": KEY,
        "REDIS_URL": redis_url,
        "QUEUE_NAME": f"fuzz-{uuid.uuid4().hex[:8]}",  # no worker listens to it
        "MAX_NEW_TOKENS": "16",  # stories stay short: the fuzzer, not the model, is measured
        "RELOAD_POLL_S": "600",
    }
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(api: ApiServer):
    return schemathesis.openapi.from_url(api.base_url + "/openapi.json")


def test_every_route_is_fuzzed() -> None:
    assert {
        ("POST", "/generate"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("POST", "/train-jobs"),
        ("GET", "/train-jobs/{job_id}"),
        ("POST", "/admin/reload"),
        ("GET", "/health"),
    } <= set(OPERATIONS)


@pytest.mark.parametrize("authorized", [True, False], ids=["with-key", "without-key"])
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_the_schema_holds_under_fuzzing(
    api: ApiServer, api_schema, method: str, path: str, authorized: bool, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {KEY}"} if authorized else {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same examples on every run: a failure here reproduces
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded, and derandomized
    )
    def fuzz(case) -> None:
        if not authorized:
            case.headers = {
                name: value
                for name, value in (case.headers or {}).items()
                if name.lower() != "authorization"
            }
        case.call_and_validate(base_url=api.base_url, headers=headers, checks=CHECKS, timeout=10)

    fuzz()
