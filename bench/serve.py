"""Serving throughput and latency: 1, 4, 16 and 64 concurrent clients streaming /v1/completions
from `slm serve`, and, in the same run on identical weights, Hugging Face transformers' offline
batched ``generate`` at batch 16.

    python bench/serve.py                       # the seed preset at block 512, random weights
    python bench/serve.py --clients 1 16 --new-tokens 64 --json out.json

Each client sends ``--requests`` streaming requests one after another (greedy, 128 new tokens by
default; random weights almost never write end-of-text, so every stream runs its full length).
Per level: aggregate
generated tokens per second over the level's wall time, time to first token and inter-token
latency percentiles measured by the client, and the number of failed requests. Not a test: speed
is measured here, never asserted in the test suite.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from contract.broker import free_port

PROMPT = "Once upon a time, there was a little"


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


async def one_stream(client: httpx.AsyncClient, new_tokens: int) -> Stream:
    body = {
        "model": "slm",
        "prompt": PROMPT,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
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


async def run_level(base_url: str, clients: int, requests: int, new_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def one_client() -> list[Stream]:
            return [await one_stream(client, new_tokens) for _ in range(requests)]

        started = time.perf_counter()
        per_client = await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    streams = [stream for streams in per_client for stream in streams]
    ttfts = [s.ttft_s for s in streams if s.ttft_s is not None]
    gaps = [gap for s in streams for gap in s.gaps_s]
    errors = [s.error for s in streams if not s.ok]
    return {
        "clients": clients,
        "requests": len(streams),
        "tokens": sum(s.tokens for s in streams if s.ok),
        "wall_s": wall,
        "tokens_per_s": sum(s.tokens for s in streams if s.ok) / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_ms": 1000 * percentile(ttfts, 99) if ttfts else None,
        "itl_p50_ms": 1000 * percentile(gaps, 50) if gaps else None,
        "itl_p99_ms": 1000 * percentile(gaps, 99) if gaps else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def start_service(checkpoints: Path, port: int, log: Path, **settings: str) -> subprocess.Popen:
    """`slm serve` on ``port`` over ``checkpoints``, with ``settings`` as its environment
    variables (MAX_BATCH_SIZE="64"...), once /ready answers. No Redis and no API key: the
    benchmarks measure generation only."""
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
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"`slm serve` exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit(f"`slm serve` was not ready within 120 s:\n{log.read_text()}")


def hf_batch(checkpoint_dir: Path, batch: int, new_tokens: int, repeats: int) -> float:
    """Median aggregate tokens/s of transformers' greedy generate, ``batch`` prompts at once."""
    from decode import hf_decode  # bench/decode.py: the same call the decode benchmark times
    from transformers import GPT2LMHeadModel

    from model.checkpoint import load_checkpoint, newest_checkpoint
    from model.export.hf import export_hf
    from model.tokenizer import get_tokenizer

    model, _ = load_checkpoint(newest_checkpoint(checkpoint_dir))
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, Path(folder))
        hf_model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [get_tokenizer().encode(PROMPT)] * batch
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = hf_decode(hf_model, prompts, new_tokens)
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--block-size", type=int, default=512, help="room for prompt + tokens")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=2, help="streams per client, in turn")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64, help="the service's MAX_BATCH_SIZE")
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--hf-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        checkpoints = Path(folder) / "checkpoints"
        subprocess.run(
            [
                "slm",
                "init",
                "--preset",
                args.preset,
                "--block-size",
                str(args.block_size),
                "--out",
                str(checkpoints / "bench"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        hf_rate = hf_batch(checkpoints, args.hf_batch, args.new_tokens, args.hf_repeats)
        port = free_port()
        service = start_service(
            checkpoints,
            port,
            Path(folder) / "serve.log",
            MAX_BATCH_SIZE=str(args.max_batch),
            MAX_WAITING="1024",
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            asyncio.run(run_level(base_url, 1, 1, 8))  # warm-up
            levels = [
                asyncio.run(run_level(base_url, clients, args.requests, args.new_tokens))
                for clients in args.clients
            ]
        finally:
            service.terminate()
            service.wait(30)

    single = next((level["tokens_per_s"] for level in levels if level["clients"] == 1), None)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, preset {args.preset}, {args.new_tokens} new tokens"
    )
    print(
        "| clients | tok/s | vs 1 stream | vs HF batch | TTFT p50 / p99 ms | "
        "ITL p50 / p99 ms | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        versus_single = f"{level['tokens_per_s'] / single:.2f}×" if single else ""
        print(
            f"| {level['clients']} | {level['tokens_per_s']:.1f} | {versus_single} | "
            f"{level['tokens_per_s'] / hf_rate:.2f}× | "
            f"{level['ttft_p50_ms']:.0f} / {level['ttft_p99_ms']:.0f} | "
            f"{level['itl_p50_ms']:.1f} / {level['itl_p99_ms']:.1f} | {level['errors']} |"
        )
        if level["first_error"]:
            print(f"  first error: {level['first_error']}")
    print(f"HF transformers generate, offline batch {args.hf_batch}: {hf_rate:.1f} tok/s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "levels": levels,
                    "hf_batch_tokens_per_s": hf_rate,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
