"""Prometheus metrics, all defined here (GET /metrics serves them in the text format).

Latencies are histograms so p50/p99 can be taken server-side; counts carry only labels with a
small, fixed set of values (route templates, status codes, outcomes), never user input.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.decode_step import COMPILED_STEPS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("slm_requests_total", "HTTP requests by route and status", ["route", "status"])
TIME_TO_FIRST_TOKEN = Histogram(
    "slm_time_to_first_token_seconds", "Request arrival to first token", buckets=LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "slm_inter_token_latency_seconds", "Time between tokens of a stream", buckets=TOKEN_BUCKETS
)
END_TO_END_LATENCY = Histogram(
    "slm_request_latency_seconds", "Request arrival to last token", buckets=LATENCY_BUCKETS
)
QUEUE_TIME = Histogram(
    "slm_queue_time_seconds",
    "Time a request waited before joining the batch",
    buckets=LATENCY_BUCKETS,
)
# ``model`` labels are run names: a small set, fixed by what lies under CHECKPOINT_DIR.
PROMPT_TOKENS = Counter("slm_prompt_tokens_total", "Prompt tokens processed", ["model"])
GENERATED_TOKENS = Counter("slm_generated_tokens_total", "Tokens generated", ["model"])
RUNNING = Gauge("slm_running_requests", "Sequences in the decode batch")
WAITING = Gauge("slm_waiting_requests", "Requests waiting to join the batch")
BATCH_SIZE = Histogram(
    "slm_batch_size", "Sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
LOADED_MODEL = Gauge(
    "slm_loaded_model",
    "1 for each checkpoint serving new requests: its run, version and training step",
    ["model", "version", "step"],
)
ENGINE_RESTARTS = Counter(
    "slm_engine_restarts_total", "Times the decode loop failed outside a step and started again"
)
COMPILED_DECODE_STEPS = Gauge(
    "slm_compiled_decode_steps",
    "Decode-step shapes (a model's shape × a batch bucket) compiled and decoding compiled; the "
    "rest decode eager (COMPILE_DECODE)",
)
COMPILED_DECODE_STEPS.set_function(COMPILED_STEPS.compiled_count)
RELOADS = Counter("slm_reloads_total", "Checkpoint reload attempts by outcome", ["outcome"])
GENERATIONS = Counter(
    "slm_generations_total",
    "Generations by model and how they ended: a finish reason, or cancelled (client gone), "
    "timeout, error",
    ["model", "reason"],
)


class RequestMetrics:
    """ASGI middleware counting every answer in REQUESTS by route template and status.

    The router records the route it picked in the scope before the answer starts; an answer
    given before routing (413 from the body limit, which sits inside this middleware) or for an
    unknown path counts as "unmatched", so labels stay a small fixed set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                REQUESTS.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
