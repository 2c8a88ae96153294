"""Load: 64 concurrent clients streaming /generate from `slm serve` until 1,000 stories have been
written (or a time limit), with a batch small enough that overflow is answered with 429.

    python bench/load.py                        # tiny preset, random weights, MAX_BATCH_SIZE 32,
                                                # MAX_WAITING 16: 48 accepted, the rest 429
    python bench/load.py --streams 2000 --json out.json

Each client loops: one streaming request (random prompt, seed and sampling settings; one in ten
hangs up after three events, as a closed browser tab does), and after a 429 it waits the
Retry-After the server sent (scaled by --backoff) before trying again. Reported: requests, stories
finished, client hang-ups, 429s, errors (anything else: must be 0), and the server's resident
memory (VmRSS from /proc/<pid>/status) after the first 100 stories and after the last, with the
change in percent. Everything is on 127.0.0.1; the run is bounded by --streams and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serve import start_service, stop  # bench/serve.py: the same `slm serve` start-up

from contract.broker import free_port

PROMPTS = ["Once upon a time", "Tom had a red ball.", "The sun was", "Lily and her mom", ""]


@dataclass
class Tally:
    requests: int = 0
    finished: int = 0
    hung_up: int = 0
    refused_429: int = 0
    errors: list[str] = field(default_factory=list)
    rss_kb: dict[int, int] = field(default_factory=dict)  # stories finished → VmRSS


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def write_model(root: Path, preset_name: str) -> None:
    from model import GPT, preset
    from model.checkpoint import save_checkpoint

    save_checkpoint(root / "load", GPT(preset(preset_name)).eval(), step=0)


async def one_request(
    client: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, tally: Tally
) -> float:
    """One streaming request; returns how long to wait before the next (Retry-After on 429)."""
    body = {
        "prompt": rng.choice(PROMPTS),
        "max_new_tokens": rng.randint(1, args.new_tokens),
        "temperature": rng.choice([0, 0.8, 1.0]),
        "top_k": rng.choice([None, 40]),
        "seed": rng.randrange(2**31),
        "stop": rng.choice([[], ["."], ["the", "!"]]),
    }
    hang_up = rng.random() < 0.1
    tally.requests += 1
    async with client.stream("POST", "/generate", json=body) as response:
        if response.status_code == 429:
            tally.refused_429 += 1
            await response.aread()
            return float(response.headers.get("retry-after", "1")) * args.backoff
        if response.status_code != 200:
            tally.errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
            return 0.0
        events, current = 0, None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                current = line.partition(":")[2].strip()
                events += 1
                if current == "error":
                    tally.errors.append("error event")
                    return 0.0
                if current == "done":
                    tally.finished += 1
                    return 0.0
                if hang_up and events >= 3:
                    tally.hung_up += 1
                    return 0.0  # leaving the block closes the connection mid-stream
    tally.errors.append("stream ended without a done event")
    return 0.0


async def run(base_url: str, pid: int, args: argparse.Namespace) -> tuple[Tally, float]:
    tally = Tally()
    stop_at = time.monotonic() + args.max_seconds
    marks = sorted({args.first_mark, args.streams})

    def note_rss() -> None:
        for mark in marks:
            if tally.finished >= mark and mark not in tally.rss_kb:
                tally.rss_kb[mark] = rss_kb(pid)

    async def client_loop(index: int) -> None:
        rng = random.Random(index)
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            while tally.finished < args.streams and time.monotonic() < stop_at:
                try:
                    wait = await one_request(client, rng, args, tally)
                except httpx.HTTPError as error:
                    tally.errors.append(repr(error))
                    wait = 0.1
                note_rss()
                if wait:
                    await asyncio.sleep(wait)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(args.clients)))
    elapsed = time.perf_counter() - started
    await asyncio.sleep(1)  # let the server drop the last hung-up streams
    tally.rss_kb.setdefault(-1, rss_kb(pid))  # at the end, idle
    return tally, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1000, help="stop after this many stories")
    parser.add_argument("--first-mark", type=int, default=100, help="RSS baseline after this many")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--new-tokens", type=int, default=48, help="at most, per request")
    parser.add_argument("--max-batch", type=int, default=32, help="the service's MAX_BATCH_SIZE")
    parser.add_argument("--max-waiting", type=int, default=16, help="the service's MAX_WAITING")
    parser.add_argument("--backoff", type=float, default=0.25, help="× Retry-After after a 429")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="slm-load-") as folder:
        root = Path(folder)
        write_model(root / "checkpoints", args.preset)
        port = free_port()
        log = root / "serve.log"
        process = start_service(
            root / "checkpoints",
            port,
            log,
            MAX_BATCH_SIZE=str(args.max_batch),
            MAX_WAITING=str(args.max_waiting),
            MAX_NEW_TOKENS=str(args.new_tokens),
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            tally, elapsed = asyncio.run(run(base_url, process.pid, args))
        finally:
            stop(process)

    first, last = tally.rss_kb.get(args.first_mark), tally.rss_kb.get(args.streams)
    growth = None if first is None or last is None else 100 * (last - first) / first
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "preset": args.preset,
        "clients": args.clients,
        "max_batch_size": args.max_batch,
        "max_waiting": args.max_waiting,
        "seconds": round(elapsed, 1),
        "requests": tally.requests,
        "stories_finished": tally.finished,
        "client_hang_ups": tally.hung_up,
        "answered_429": tally.refused_429,
        "errors": len(tally.errors),
        "error_samples": tally.errors[:5],
        f"rss_mb_after_{args.first_mark}": first and round(first / 1024, 1),
        f"rss_mb_after_{args.streams}": last and round(last / 1024, 1),
        "rss_mb_idle_at_end": round(tally.rss_kb[-1] / 1024, 1),
        "rss_growth_percent": growth if growth is None else round(growth, 2),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if tally.errors or (growth is not None and growth > 5):
        sys.exit(1)


if __name__ == "__main__":
    main()
