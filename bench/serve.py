"""Serving throughput and latency against llama.cpp's ``llama-server`` on identical weights, in
one run: N concurrent clients each stream ``/v1/completions`` from our `slm serve` and from
llama-server serving our own GGUF export (f32) of the same checkpoint, greedy and sampled.

    python bench/serve.py                       # the seed preset at block 512, random weights
    LLAMA_SERVER=/tmp/llama.cpp/bin/llama-server python bench/serve.py --json out.json
    python bench/serve.py --clients 1 16 --repeats 1 --new-tokens 64   # a quick look
    python bench/serve.py --preset small --block-size 128 --vocabulary gpt2 --vocabulary gpt2-8k

Both servers get the same client and the same request bodies: ``--requests`` streams per client,
one after another, 128 new tokens after a short prompt, a distinct seed per request; sampled is
temperature 0.8 after top-k 40, top-p 0.95 and min-p 0.05 (llama-server's defaults, spelled out
so both sides do the same work), temperature is 0.8 alone over the whole vocabulary (what an
OpenAI client sends), greedy is temperature 0. Levels are interleaved, ours then
theirs, ``--repeats`` times; the tables print medians and our ratio. Then two latency checks:
a burst of 64 arrivals at once (TTFT p50 and p99), and 16 running streams while a prompt of
nearly the whole context arrives (inter-token gap p99 of the running streams). llama-server runs
with one slot per stream of our batch (``-np``), the block size per slot and torch's thread
count; without it (no LLAMA_SERVER and none on PATH) only our figures print. Random weights
almost never write end-of-text, so streams run their full length. With several ``--vocabulary``
ours is served once per vocabulary, interleaved too, and a last table gives each one's tokens/s
and text bytes/s (tokens/s × its bytes per token over the shared valid stories). Not a test:
speed is measured here, never asserted in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from decode import MIN_P, TEMPERATURE, TOP_K, TOP_P, VALID_FILE  # bench/decode.py: the same chain
from prometheus_client.parser import text_string_to_metric_families
from quality import story_bytes, valid_stories  # bench/quality.py: the stories as it judges them

from contract.broker import free_port
from model import preset
from model.cache import KVCache
from model.config import vocabulary_size
from model.decode_step import step_count
from model.tokenizer import get_tokenizer

PROMPT = "Once upon a time, there was a little girl who loved to"
# Nearly a whole 512-token context: the prompt that arrives while streams are running.
LONG_PROMPT = "Once upon a time there was a little girl named Lily who loved to play. " * 28
# sampled: llama-server's default chain spelled out; temperature: 0.8 alone, what an OpenAI
# client sends (the whole vocabulary is drawn from: top-k 0 is off on both servers).
MODES = ("sampled", "temperature", "greedy")
RUN = "bench"  # our run's name: `model` in every request (llama-server takes any name)


def request_body(mode: str, new_tokens: int, seed: int, prompt: str = PROMPT) -> dict:
    """The same body for both servers."""
    body = {
        "model": RUN,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mode == "greedy":
        return {**body, "temperature": 0}
    if mode == "temperature":
        return {**body, "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    return {**body, "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P, "min_p": MIN_P}


@dataclass
class Stream:
    ok: bool
    tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client: httpx.AsyncClient, body: dict) -> Stream:
    started = time.perf_counter()
    last = None
    result = Stream(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    result.ok = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - started
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                    chunks += 1
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    result.tokens = result.tokens or chunks
    return result


def summary(streams: list[Stream], wall: float) -> dict:
    ttfts = [s.ttft_s for s in streams if s.ttft_s is not None]
    gaps = [gap for s in streams for gap in s.gaps_s]
    errors = [s.error for s in streams if not s.ok]
    tokens = sum(s.tokens for s in streams if s.ok)
    return {
        "requests": len(streams),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_ms": 1000 * percentile(ttfts, 99) if ttfts else None,
        "itl_p50_ms": 1000 * percentile(gaps, 50) if gaps else None,
        "itl_p99_ms": 1000 * percentile(gaps, 99) if gaps else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def client_for(base_url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 4)
    return httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits)


async def run_level(
    base_url: str, clients: int, requests: int, new_tokens: int, mode: str, seed: int = 0
) -> dict:
    """``clients`` concurrent clients, each streaming ``requests`` stories in turn."""
    async with client_for(base_url, clients) as client:

        async def one_client(index: int) -> list[Stream]:
            return [
                await one_stream(
                    client, request_body(mode, new_tokens, seed + index * requests + turn)
                )
                for turn in range(requests)
            ]

        started = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return summary([stream for streams in per_client for stream in streams], wall)


async def long_prompt_arrives(base_url: str, running: int, new_tokens: int) -> dict:
    """``running`` sampled streams; once they stream, a prompt of nearly the whole context
    arrives. Returns the running streams' inter-token gaps (p50, p99) and the long prompt's
    time to first token."""
    async with client_for(base_url, running + 1) as client:
        streams = [
            asyncio.create_task(one_stream(client, request_body("sampled", new_tokens, seed)))
            for seed in range(running)
        ]
        await asyncio.sleep(1.0)
        long = await one_stream(client, request_body("sampled", 16, 999, LONG_PROMPT))
        started = time.perf_counter()
        done = await asyncio.gather(*streams)
    result = summary(done, time.perf_counter() - started)
    result["long_prompt_ttft_ms"] = 1000 * long.ttft_s if long.ttft_s else None
    result["long_prompt_error"] = long.error
    return result


def init_run(run_dir: Path, preset: str, block_size: int, vocabulary: str | None = None) -> None:
    """An untrained checkpoint of ``preset`` at ``block_size`` (in ``vocabulary``, else the
    preset's), as a user's `slm init` writes it: speed does not depend on what the weights
    learned."""
    command = ["slm", "init", "--preset", preset, "--block-size", str(block_size)]
    command += ["--out", str(run_dir)] + (["--vocabulary", vocabulary] if vocabulary else [])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (a server finishes its streams and exits), then SIGKILL if it is still up 30 s
    later."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_figures(args: argparse.Namespace, figures: dict) -> None:
    """The figures and the arguments that produced them, to ``--json`` when given."""
    if args.json:
        document = {"args": vars(args) | {"json": None}, **figures}
        args.json.write_text(json.dumps(document, indent=2))


def start_service(
    checkpoints: Path, port: int, log: Path, compiled_steps: int = 0, **settings: str
) -> subprocess.Popen:
    """`slm serve` on ``port`` over ``checkpoints``, with ``settings`` as its environment
    variables (MAX_BATCH_SIZE="64"...), once /ready answers and ``compiled_steps`` decode
    steps are compiled (one per batch bucket and span; 0: no wait). Prints how long each
    took. No Redis and no API key: the benchmarks measure generation only."""
    slm = shutil.which("slm") or sys.exit("the `slm` command is not installed (pip install -e .)")
    env = {**os.environ, "CHECKPOINT_DIR": str(checkpoints), **settings}
    env.pop("REDIS_URL", None)
    env.pop("API_KEY", None)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [slm, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    wait_until_ready(process, f"http://127.0.0.1:{port}/ready", log, "`slm serve`")
    print(f"slm serve: ready in {time.monotonic() - started:.1f} s", flush=True)
    if compiled_steps:
        wait_until_compiled(process, f"http://127.0.0.1:{port}/metrics", compiled_steps, log)
        print(
            f"slm serve: {compiled_steps} compiled decode steps warm "
            f"{time.monotonic() - started:.1f} s after start",
            flush=True,
        )
    return process


def wait_until_compiled(process: subprocess.Popen, url: str, steps: int, log: Path) -> None:
    def compiled() -> bool:
        families = text_string_to_metric_families(httpx.get(url, timeout=5).text)
        return any(
            family.name == "slm_compiled_decode_steps" and family.samples[0].value >= steps
            for family in families
        )

    wait_until(process, compiled, log, f"`slm serve`'s {steps} compiled decode steps", 600)


def start_llama_server(
    binary: str, gguf: Path, port: int, slots: int, context: int, threads: int, log: Path
) -> subprocess.Popen:
    """llama-server on ``gguf`` with ``slots`` parallel slots of ``context`` tokens each, once
    /health answers."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                *("-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
                *("-np", str(slots), "-c", str(slots * context)),
                *("-t", str(threads), "-tb", str(threads), "--no-webui"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    wait_until_ready(process, f"http://127.0.0.1:{port}/health", log, "llama-server")
    return process


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, name: str) -> None:
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(process, answers, log, name, 120)


def wait_until(
    process: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str, seconds: float
) -> None:
    """Poll ``ready`` until it holds; exit with the server's log if it dies or ``seconds`` pass
    (killing it then)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what}: the server exited with {process.returncode}:\n{log.read_text()}")
        if ready():
            return
        time.sleep(0.2)
    process.kill()
    sys.exit(f"{what}: not ready within {seconds:g} s:\n{log.read_text()}")


def ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}×" if ours and theirs else "–"


def figure(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def median_of(runs: list[dict]) -> dict:
    """The median of every figure over repeated runs of one level (errors summed)."""
    merged = {}
    for key in runs[0]:
        values = [run[key] for run in runs if isinstance(run[key], int | float)]
        if key == "errors":
            merged[key] = sum(values)
        elif values and len(values) == len(runs):
            merged[key] = statistics.median(values)
        else:
            merged[key] = next((run[key] for run in runs if run[key]), None)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument(
        "--vocabulary",
        action="append",
        default=[],
        help="serve the preset with this vocabulary (repeat to compare; default: the preset's)",
    )
    parser.add_argument("--block-size", type=int, default=512, help="room for prompt + tokens")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--requests", type=int, default=2, help="streams per client, in turn")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per level")
    parser.add_argument("--max-batch", type=int, default=64, help="MAX_BATCH_SIZE, and -np")
    parser.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"),
        help="the peer's binary (default: $LLAMA_SERVER, else llama-server on PATH)",
    )
    parser.add_argument(
        "--compile-decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="COMPILE_DECODE for our server; measuring starts once every bucket is compiled",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    vocabularies = args.vocabulary or [preset(args.preset).vocabulary]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        servers: dict[str, str] = {}
        processes = []
        try:
            # Ours once per vocabulary, each its own server; the first is "ours" (and the
            # GGUF llama-server serves), the others "ours, <vocabulary>".
            for index, vocabulary in enumerate(vocabularies):
                checkpoints = root / f"checkpoints-{index}"
                init_run(checkpoints / RUN, args.preset, args.block_size, vocabulary)
                config = preset(
                    args.preset, block_size=args.block_size, vocab_size=vocabulary_size(vocabulary)
                )
                row_bytes = KVCache.row_bytes(config, torch.float32)
                port = free_port()
                processes.append(
                    start_service(
                        checkpoints,
                        port,
                        root / f"serve-{index}.log",
                        step_count(args.max_batch, args.block_size) if args.compile_decode else 0,
                        MAX_BATCH_SIZE=str(args.max_batch),
                        MAX_WAITING="1024",
                        DECODE_THREADS=str(threads),
                        COMPILE_DECODE=str(args.compile_decode).lower(),
                        # A row of the KV cache per stream, as llama-server has a slot per stream.
                        KV_CACHE_BYTES=str(max(256 << 20, args.max_batch * row_bytes)),
                    )
                )
                servers["ours" if index == 0 else f"ours, {vocabulary}"] = (
                    f"http://127.0.0.1:{port}"
                )
            checkpoints = root / "checkpoints-0"
            if args.llama_server:
                gguf = export_gguf_of(checkpoints, root / "model-f32.gguf")
                port = free_port()
                processes.append(
                    start_llama_server(
                        args.llama_server,
                        gguf,
                        port,
                        args.max_batch,
                        args.block_size,
                        threads,
                        root / "llama-server.log",
                    )
                )
                servers["llama-server"] = f"http://127.0.0.1:{port}"
            figures = measure(args, servers)
        finally:
            for process in processes:
                stop(process)
    report(args, figures, threads)
    if len(vocabularies) > 1:
        report_vocabularies(args, figures, vocabularies)
    write_figures(args, figures)


def export_gguf_of(checkpoints: Path, path: Path) -> Path:
    from model.checkpoint import load_checkpoint, newest_checkpoint
    from model.export.gguf import export_gguf

    model, _ = load_checkpoint(newest_checkpoint(checkpoints))
    export_gguf(model, path, "f32")
    return path


def measure(args: argparse.Namespace, servers: dict[str, str]) -> dict:
    for url in servers.values():  # warm-up
        asyncio.run(run_level(url, 1, 1, 8, "sampled"))
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in args.modes:
            for clients in args.clients:
                for name, url in servers.items():
                    level = asyncio.run(
                        run_level(url, clients, args.requests, args.new_tokens, mode)
                    )
                    runs.setdefault(f"{name}|{mode}|{clients}", []).append(level)
    levels = {key: median_of(values) for key, values in runs.items()}
    burst: dict[str, list[dict]] = {}
    long_prompt: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, url in servers.items():
            burst.setdefault(name, []).append(asyncio.run(run_level(url, 64, 1, 16, "sampled")))
            long_prompt.setdefault(name, []).append(asyncio.run(long_prompt_arrives(url, 16, 96)))
    return {
        "levels": levels,
        "runs": runs,
        "burst_64": {name: median_of(values) for name, values in burst.items()},
        "long_prompt_among_16": {name: median_of(values) for name, values in long_prompt.items()},
    }


def report(args: argparse.Namespace, figures: dict, threads: int) -> None:
    levels = figures["levels"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {threads} threads each, preset {args.preset} at block "
        f"{args.block_size}, {args.new_tokens} new tokens, {args.requests} streams per client, "
        f"medians of {args.repeats} interleaved runs, COMPILE_DECODE={args.compile_decode}"
    )
    print(
        "| mode | streams | ours tok/s | llama-server tok/s | ratio | TTFT p50 ours / theirs ms "
        "| ITL p99 ours / theirs ms | errors ours / theirs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        for clients in args.clients:
            ours = levels[f"ours|{mode}|{clients}"]
            theirs = levels.get(f"llama-server|{mode}|{clients}", {})
            print(
                f"| {mode} | {clients} | {ours['tokens_per_s']:.1f} | "
                f"{figure(theirs.get('tokens_per_s'), 1)} | "
                f"{ratio(ours['tokens_per_s'], theirs.get('tokens_per_s'))} | "
                f"{figure(ours['ttft_p50_ms'])} / {figure(theirs.get('ttft_p50_ms'))} | "
                f"{figure(ours['itl_p99_ms'], 1)} / {figure(theirs.get('itl_p99_ms'), 1)} | "
                f"{ours['errors']} / {theirs.get('errors', '–')} |"
            )
            for side in (ours, theirs):
                if side.get("first_error"):
                    print(f"  first error: {side['first_error']}")
    print("\nA burst of 64 sampled arrivals at once (16 tokens each):")
    for name, burst in figures["burst_64"].items():
        print(
            f"  {name}: TTFT p50 {figure(burst['ttft_p50_ms'])} ms, p99 "
            f"{figure(burst['ttft_p99_ms'])} ms (p99/p50 "
            f"{ratio(burst['ttft_p99_ms'], burst['ttft_p50_ms'])}), errors {burst['errors']}"
        )
    print("16 sampled streams running while a near-full-context prompt arrives:")
    for name, long in figures["long_prompt_among_16"].items():
        print(
            f"  {name}: running streams' ITL p50 {figure(long['itl_p50_ms'], 1)} ms, p99 "
            f"{figure(long['itl_p99_ms'], 1)} ms; the long prompt's TTFT "
            f"{figure(long['long_prompt_ttft_ms'])} ms"
            + (f" ({long['long_prompt_error']})" if long["long_prompt_error"] else "")
        )


def report_vocabularies(args: argparse.Namespace, figures: dict, vocabularies: list[str]) -> None:
    """Ours per vocabulary: tokens/s, and text bytes/s (tokens/s × the vocabulary's bytes per
    token over the shared valid stories, each followed by <|endoftext|>, counted as
    bench/quality.py counts them)."""
    stories = valid_stories(VALID_FILE)
    n_bytes = story_bytes(stories)
    per_token = {}
    for name in vocabularies:
        tokenizer = get_tokenizer(vocabulary_size(name))
        per_token[name] = n_bytes / sum(len(tokenizer.encode(story)) + 1 for story in stories)
    names = ["ours" if i == 0 else f"ours, {name}" for i, name in enumerate(vocabularies)]
    print(
        "\nOurs per vocabulary, bytes per token from the shared valid stories ("
        + ", ".join(f"{name} {per_token[name]:.2f}" for name in vocabularies)
        + f"); ratio: text bytes/s against {vocabularies[0]}'s"
    )
    print(
        "| mode | streams | "
        + " | ".join(f"{v} tok/s | {v} bytes/s" for v in vocabularies)
        + " | "
        + " | ".join(f"{v} ratio" for v in vocabularies[1:])
        + " |"
    )
    print("|---|---:|" + "---:|" * (3 * len(vocabularies) - 1))
    for mode in args.modes:
        for clients in args.clients:
            rates = [
                figures["levels"][f"{name}|{mode}|{clients}"]["tokens_per_s"] for name in names
            ]
            text_rates = [rate * per_token[v] for rate, v in zip(rates, vocabularies, strict=True)]
            cells = [
                f"{rate:.1f} | {text_rate:,.0f}"
                for rate, text_rate in zip(rates, text_rates, strict=True)
            ]
            ratios = [ratio(text_rate, text_rates[0]) for text_rate in text_rates[1:]]
            print(f"| {mode} | {clients} | " + " | ".join(cells + ratios) + " |")
    figures["bytes_per_token"] = per_token


if __name__ == "__main__":
    main()
