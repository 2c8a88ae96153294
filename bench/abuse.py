"""Abuse: the attacks of a hostile client, played against a real `slm up` with no setting changed
but the bind address (``--host 0.0.0.0``, so a second address of this machine plays the network),
and what held.

    python bench/abuse.py                 # the default preset, random weights
    python bench/abuse.py --json out.json

`slm up` runs in a temporary folder (embedded Redis, a worker, the API) over a checkpoint of the
default preset and one small prepared dataset. Each attack prints what it sent, what the
documented answer is and what came back. Afterwards: a normal story must arrive within 2 s, the
API's resident memory must be back within 10 % of where it started (after one warm-up story),
and, once `slm up` is killed with SIGKILL, no process it started may remain, the port must be
free, and no run folder or download an attack asked for may exist. Exit status 1 when anything
did not hold. Not a test: the suite checks each behaviour on its own; this plays them together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from load import rss_kb  # bench/load.py: VmRSS of a process

from contract.broker import free_port
from contract.settings import Settings

STORY = {
    "model": "story",
    "prompt": "Once upon a time",
    "max_new_tokens": 16,
    "temperature": 0.8,
    "seed": 1,
}
TRAIN = {"preset": "tiny", "max_steps": 2, "batch_size": 2, "block_size": 32}


@dataclass
class Outcome:
    attack: str
    expected: str
    got: str
    held: bool


@dataclass
class Target:
    local: str  # http://127.0.0.1:port
    network: str  # http://<this machine's other address>:port
    port: int
    root: Path
    supervisor: int  # the pid of `slm up`
    connections: int  # how many the flood holds open


def network_address() -> str:
    """This machine's address on its default route: a client from there is not loopback to the
    server. (A UDP connect sends nothing.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    if address.startswith("127."):
        sys.exit("this machine has no address besides loopback: the network cannot be played")
    return address


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
            except (OSError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z"


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"pid {pid}"


def api_pid(supervisor: int) -> int:
    for pid in descendants(supervisor):
        try:
            if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    raise RuntimeError("no `slm serve` under `slm up`")


def running(target: Target) -> float:
    """The engine's decode batch, from /metrics."""
    for line in httpx.get(f"{target.local}/metrics", timeout=5).text.splitlines():
        if line.startswith("slm_running_requests"):
            return float(line.split()[-1])
    raise RuntimeError("no slm_running_requests in /metrics")


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def answer(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:80]
    return f"{response.status_code}: {message[:110]}"


def job_spec(run: str, train: dict | None = None) -> dict:
    """A train job on the prepared dataset (``prepare``), tiny unless ``train`` says otherwise."""
    return {"run_name": run, "data": {"dataset": "stories"}, "train": train or TRAIN}


# --- the attacks --------------------------------------------------------------------------------


def train_from_the_network(target: Target) -> Outcome:
    spec = job_spec("intruder")
    response = httpx.post(f"{target.network}/train-jobs", json=spec, timeout=10)
    return Outcome(
        "train from the network, no key",
        "403",
        answer(response),
        response.status_code == 403 and "API_KEY" in response.text,
    )


def rebind_dns(target: Target) -> Outcome:
    spec = job_spec("rebound")
    response = httpx.post(
        f"{target.local}/train-jobs", json=spec, headers={"Host": "attacker.example"}, timeout=10
    )
    return Outcome(
        "loopback with a foreign Host (DNS rebinding)",
        "403",
        answer(response),
        response.status_code == 403,
    )


def list_data_from_the_network(target: Target) -> Outcome:
    response = httpx.get(f"{target.network}/datasets", timeout=10)
    return Outcome(
        "list datasets from the network", "403", answer(response), response.status_code == 403
    )


def model_too_long_to_serve(target: Target) -> Outcome:
    # Within the spec's own bound on positions (8192), above the server's MAX_MODEL_BLOCK_SIZE.
    train = {**TRAIN, "preset": "small", "model_block_size": 4096}
    spec = job_spec("longest", train)
    response = httpx.post(f"{target.local}/train-jobs", json=spec, timeout=10)
    return Outcome(
        "a job whose model needs GBs of KV cache",
        "422 naming model_block_size",
        answer(response),
        response.status_code == 422 and "model_block_size" in response.text,
    )


def checkpoint_too_large_to_serve(target: Target) -> Outcome:
    """A checkpoint written straight into CHECKPOINT_DIR (not through a job) whose KV cache would
    not fit: refused at load, the old model keeps serving and stays the default."""
    from model import GPT, preset
    from model.checkpoint import save_checkpoint

    before = httpx.get(f"{target.local}/ready", timeout=5).json()
    model = GPT(preset("small", block_size=1 << 16)).eval()
    save_checkpoint(target.root / "checkpoints" / "huge", model, step=1)
    httpx.post(f"{target.local}/admin/reload", timeout=30)
    time.sleep(1)
    after = httpx.get(f"{target.local}/ready", timeout=5).json()
    story = httpx.post(
        f"{target.local}/generate", json={**STORY, "model": "huge", "stream": False}, timeout=30
    )
    return Outcome(
        "a checkpoint too large to serve appears",
        "refused; old model still default",
        f"ready {after.get('model')}; model huge: {answer(story)}",
        after.get("model") == before.get("model") is not None
        and story.status_code in (404, 422, 503),
    )


def data_source_inside(target: Target) -> Outcome:
    redis_port = embedded_redis_port(target.supervisor)
    spec = {
        "run_name": "scanner",
        "data": {"source": f"http://127.0.0.1:{redis_port}/x.txt"},
        "train": TRAIN,
    }
    response = httpx.post(f"{target.local}/train-jobs", json=spec, timeout=10)
    if response.status_code != 202:
        return Outcome(
            "a data source on loopback (a port scan)",
            "refused",
            answer(response),
            400 <= response.status_code < 500,
        )
    job = response.headers["location"]

    def ended() -> bool:
        return httpx.get(f"{target.local}{job}", timeout=5).json()["state"] in (
            "failed",
            "finished",
            "stopped",
            "cancelled",
        )

    wait_until(ended, 60)
    detail = httpx.get(f"{target.local}{job}", timeout=5).json()
    message = detail.get("message") or ""
    # What a port scanner reads: whether something listens there, and what.
    leaks = [
        word for word in ("Connection refused", "Errno", "timed out", "redis") if word in message
    ]
    return Outcome(
        "a data source on loopback (a port scan)",
        "failed, no internal detail",
        f"{detail['state']}: {message[:100]}",
        detail["state"] == "failed"
        and not leaks
        and not (target.root / "checkpoints" / "scanner").exists(),
    )


def one_run_claimed_twice(target: Target) -> Outcome:
    spec = job_spec("twice")
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        statuses.append(httpx.post(f"{target.local}/train-jobs", json=spec, timeout=10).status_code)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    return Outcome(
        "8 submissions of one run at once",
        "one 202, seven 409",
        str(counts),
        counts == {202: 1, 409: 7},
    )


def many_stories_in_one_request(target: Target) -> Outcome:
    body = {"model": "story", "prompt": ["Once"] * 64, "n": 16, "max_tokens": 1024}
    response = httpx.post(f"{target.local}/v1/completions", json=body, timeout=10)
    return Outcome(
        "64 prompts × n 16 in one request",
        "422 naming the bound",
        answer(response),
        response.status_code in (422, 429),
    )


def client_leaves_a_whole_answer(target: Target) -> Outcome:
    """A non-streaming request for many tokens whose client hangs up: decoding stops."""
    body = json.dumps({**STORY, "max_new_tokens": 1000, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", target.port)) as client:
        client.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: running(target) > 0, 10)
    dropped = wait_until(lambda: running(target) == 0, 5)
    return Outcome(
        "a whole-answer client leaves mid-story",
        "its story stops within 5 s",
        "stopped" if dropped else f"still running: {running(target):g}",
        dropped,
    )


def lone_surrogate(target: Target) -> Outcome:
    body = b'{"model": "story", "prompt": "Once \\ud800", "echo": true, "max_tokens": 1}'
    response = httpx.post(
        f"{target.local}/v1/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    return Outcome(
        "an echoed prompt with a lone surrogate",
        "4xx",
        answer(response),
        400 <= response.status_code < 500,
    )


def tiny_temperature(target: Target) -> Outcome:
    def story(temperature: float) -> str:
        body = {**STORY, "temperature": temperature, "top_k": None, "stream": False}
        return httpx.post(f"{target.local}/generate", json=body, timeout=30).json()["text"]

    same = story(1e-7) == story(0)
    return Outcome("temperature 1e-7", "the greedy story", "greedy" if same else "differs", same)


def huge_prompt(target: Target) -> Outcome:
    body = {**STORY, "prompt": "a" * 900_000, "stream": False}
    started = time.perf_counter()
    response = httpx.post(f"{target.local}/generate", json=body, timeout=30)
    took = time.perf_counter() - started
    return Outcome(
        "a 900,000-character prompt of one letter",
        "422 at once",
        f"{answer(response)} in {took:.2f} s",
        response.status_code == 422 and took < 2,
    )


def slow_headers(target: Target) -> Outcome:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", target.port)) as client:
        client.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        client.settimeout(60)
        try:
            closed = client.recv(1024) is not None
        except TimeoutError:
            closed = False
    took = time.monotonic() - started
    return Outcome(
        "headers that never finish (slow loris)",
        "connection closed",
        f"closed after {took:.1f} s" if closed else "still open after 60 s",
        closed,
    )


def stream_never_read(target: Target) -> Outcome:
    """A streaming client that never reads, with a tiny receive buffer: once the server's send
    buffer is full, its send times out (STREAM_SEND_TIMEOUT_S) and the server closes the stream,
    which the client sees as the end of what it was sent."""
    wait_s = Settings().stream_send_timeout_s + 10
    body = json.dumps({**STORY, "max_new_tokens": 1000, "logprobs": 5}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    client.connect(("127.0.0.1", target.port))
    client.sendall(
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    time.sleep(wait_s)
    client.settimeout(5)
    received, closed = 0, False
    try:
        while chunk := client.recv(1 << 16):
            received += len(chunk)
        closed = True
    except TimeoutError:
        pass
    finally:
        client.close()
    return Outcome(
        "a stream whose client never reads",
        f"closed by the server within {wait_s:g} s",
        f"closed after {received:,} bytes" if closed else "still open",
        closed,
    )


def connection_flood(target: Target) -> Outcome:
    """Many idle connections, then a request: beyond the cap the server answers 503."""
    count = target.connections
    held = [socket.create_connection(("127.0.0.1", target.port)) for _ in range(count)]
    try:
        for connection in held:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        time.sleep(0.5)
        response = httpx.get(f"{target.local}/health", timeout=10)
    finally:
        for connection in held:
            connection.close()
    return Outcome(
        f"{count} connections held open, then a request",
        "503 beyond the cap",
        answer(response),
        response.status_code == 503,
    )


ATTACKS: list[Callable[[Target], Outcome]] = [
    train_from_the_network,
    rebind_dns,
    list_data_from_the_network,
    model_too_long_to_serve,
    checkpoint_too_large_to_serve,
    data_source_inside,
    many_stories_in_one_request,
    client_leaves_a_whole_answer,
    lone_surrogate,
    tiny_temperature,
    huge_prompt,
    slow_headers,
    stream_never_read,
    connection_flood,
]


# --- the run ------------------------------------------------------------------------------------


def report(outcome: Outcome, api: int | None = None) -> Outcome:
    """Print what held, with the API's resident memory after it while the API runs."""
    memory = f" [API {rss_kb(api) / 1024:.0f} MiB]" if api is not None else ""
    print(
        f"{'held' if outcome.held else 'FAILED':>6}  {outcome.attack}: "
        f"{outcome.got} (expected {outcome.expected}){memory}",
        flush=True,
    )
    return outcome


def loaded(target: Target, run: str) -> bool:
    models = httpx.get(f"{target.local}/v1/models", timeout=5).json()["data"]
    return any(model["id"] == run and model.get("loaded") for model in models)


def normal_story_s(target: Target) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{target.local}/generate", json={**STORY, "stream": False}, timeout=30)
    response.raise_for_status()
    return time.perf_counter() - started


def prepare(root: Path) -> None:
    """A checkpoint of the default preset and a small prepared dataset, as a user would have."""
    from model import GPT, preset
    from model.checkpoint import save_checkpoint
    from worker.data import prepare as prepare_data

    save_checkpoint(root / "checkpoints" / "story", GPT(preset("small")).eval(), step=0)
    text = root / "stories"
    text.mkdir()
    stories = [f"Once upon a time, a cat named Tom{i} found a ball. The end." for i in range(200)]
    for split in ("train", "valid"):
        (text / f"stories-{split}.txt").write_text("\n<|endoftext|>\n".join(stories))
    prepare_data(text, root / "data" / "stories", quiet=True)


def start_up(root: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "CHECKPOINT_DIR": str(root / "checkpoints"),
        "DATA_DIR": str(root / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("REDIS_URL", "API_KEY"):
        env.pop(name, None)
    log = (root / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "slm.cli", "up", "--host", "0.0.0.0", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ready = wait_until(
        lambda: process.poll() is None and _answers(f"http://127.0.0.1:{port}/ready"), 120
    )
    if not ready:
        process.kill()
        sys.exit(f"`slm up` did not get ready:\n{(root / 'up.log').read_text()}")
    return process


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def embedded_redis_port(supervisor: int) -> int:
    for pid in descendants(supervisor):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv and argv[0].endswith(b"redis-server"):
            for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    return int(fields[1].split(":")[1], 16)
    return 6379


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections",
        type=int,
        default=Settings().max_connections + 10,
        help="idle ones in the flood (default: MAX_CONNECTIONS + 10)",
    )
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    args = parser.parse_args()

    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="slm-abuse-") as folder:
        root = Path(folder)
        prepare(root)
        port = free_port()
        supervisor = start_up(root, port)
        target = Target(
            f"http://127.0.0.1:{port}",
            f"http://{network_address()}:{port}",
            port,
            root,
            supervisor.pid,
            args.connections,
        )
        api = api_pid(supervisor.pid)
        # The one job an attack gets queued trains a real model, which the API then loads: play
        # that attack first and let its model load, so the memory compared is the attacks'.
        outcomes.append(report(one_run_claimed_twice(target), api))
        if not wait_until(lambda: loaded(target, "twice"), 300):
            sys.exit(f"the accepted job's model was never loaded:\n{(root / 'up.log').read_text()}")
        normal_story_s(target)  # warm-up: the KV cache and the first forward's buffers
        rss_before = rss_kb(api)
        for attack in ATTACKS:
            try:
                outcome = attack(target)
            except Exception as error:  # an attack that broke the client is a finding too
                outcome = Outcome(
                    attack.__name__, "an answer", f"{type(error).__name__}: {error}", False
                )
            outcomes.append(report(outcome, api))

        time.sleep(2)
        story_s = normal_story_s(target)
        outcomes.append(
            report(
                Outcome("a normal story afterwards", "within 2 s", f"{story_s:.2f} s", story_s < 2),
                api,
            )
        )
        rss_after = rss_kb(api)
        change = (rss_after - rss_before) / rss_before
        memory = f"{rss_before / 1024:.0f} → {rss_after / 1024:.0f} MiB ({change:+.1%})"
        outcomes.append(
            report(
                Outcome("the API's memory", "within 10 % of the start", memory, abs(change) <= 0.1),
                api,
            )
        )

        children = descendants(supervisor.pid)
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        gone = wait_until(lambda: not any(alive(pid) for pid in children), 30)
        left = sorted(pid for pid in children if alive(pid))
        said = "all gone" if gone else f"left: {[command_of(pid) for pid in left]}"
        outcomes.append(
            report(Outcome("`slm up` killed with SIGKILL", "no child left", said, gone))
        )
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
            try:
                probe.bind(("0.0.0.0", port))
                free = True
            except OSError:
                free = False
        outcomes.append(report(Outcome("the port", "free", "free" if free else "taken", free)))
        runs = sorted(p.name for p in (root / "checkpoints").iterdir() if p.is_dir())
        # The run written by hand, the default one, the one job that was queued: no other.
        expected = {"huge", "story", "twice"}
        outcomes.append(
            report(
                Outcome(
                    "run folders", f"{sorted(expected)} at most", str(runs), set(runs) <= expected
                )
            )
        )
        datasets = sorted(p.name for p in (root / "data").iterdir())
        outcomes.append(
            report(
                Outcome(
                    "DATA_DIR",
                    "['stories'] only: nothing downloaded",
                    str(datasets),
                    datasets == ["stories"],
                )
            )
        )

    held = sum(outcome.held for outcome in outcomes)
    print(f"\n{held}/{len(outcomes)} held on {platform.machine()}, {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps([asdict(outcome) for outcome in outcomes], indent=2))
    sys.exit(0 if held == len(outcomes) else 1)


if __name__ == "__main__":
    main()
