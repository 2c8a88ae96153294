"""The engine in-process: continuous batching, models side by side, cancellation, limits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY
from servers import wait_for, write_checkpoint

from contract.settings import Settings
from model.checkpoint import load_checkpoint
from model.device import use_torch_threads
from model.sampling import SamplingParams
from service.engine import (
    Busy,
    DeadlinePassed,
    Engine,
    Finish,
    PromptRejected,
    Story,
    TextPiece,
)
from service.loaded import LoadedModel

PROMPTS = ["Once upon a time", "Tom had a red ball.", "The sun", "Lily and her mom went to"]


def load(run_dir: Path, seed: int) -> LoadedModel:
    version = write_checkpoint(run_dir, seed=seed)
    model, meta = load_checkpoint(run_dir)
    return LoadedModel(model=model, meta=meta, path=run_dir, version=version)


@pytest.fixture
def start_engine(tmp_path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def start(**settings: Any) -> Engine:
        engine = Engine(Settings(checkpoint_dir=tmp_path, **settings))
        engine.install(load(tmp_path / "run-a", seed=0))
        engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


def run(scenario: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(60):  # never hang the suite
            return await scenario

    return asyncio.run(bounded())


def sample_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_story_is_the_same_alone_or_among_fifteen_others(start_engine, temperature) -> None:
    engine = start_engine(max_batch_size=16)
    params = SamplingParams(max_new_tokens=40, temperature=temperature, top_k=50, seed=42)

    async def scenario() -> tuple[Story, list[Story]]:
        alone = await (await engine.submit(PROMPTS[0], params)).story()
        crowd = [
            engine.submit(PROMPTS[i % 4] + " x" * i, SamplingParams(max_new_tokens=30 + i, seed=i))
            for i in range(15)
        ]
        generations = await asyncio.gather(
            *crowd[:7], engine.submit(PROMPTS[0], params), *crowd[7:]
        )
        return alone, await asyncio.gather(*(g.story() for g in generations))

    alone, batched = run(scenario())
    assert batched[7].token_ids == alone.token_ids
    assert batched[7].text == alone.text
    assert len(alone.token_ids) == 40


def test_streams_in_flight_finish_on_their_model_while_new_ones_get_the_new(
    start_engine, tmp_path
) -> None:
    engine = start_engine()
    old_version = engine.model.version
    long_story = SamplingParams(max_new_tokens=1500, temperature=0)
    order: list[str] = []

    async def consume(records: AsyncIterator[TextPiece | Finish], name: str) -> Finish:
        async for item in records:
            if isinstance(item, Finish):
                order.append(f"{name} finished")
                return item
            if not order or order[-1] != f"{name} streams":
                order.append(f"{name} streams")
        raise AssertionError("no Finish record")

    async def scenario() -> tuple[Finish, Finish, Story]:
        old_records = (await engine.submit(PROMPTS[0], long_story)).records()
        assert isinstance(await anext(old_records), TextPiece)
        await asyncio.to_thread(engine.install, load(tmp_path / "run-b", seed=1))
        new = await engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0))
        finished_new, finished_old = await asyncio.gather(
            consume(new.records(), "new"), consume(old_records, "old")
        )
        replay = await (await engine.submit(PROMPTS[0], long_story)).story()
        return finished_old, finished_new, replay

    finished_old, finished_new, replay_on_new = run(scenario())
    assert finished_old.version == old_version
    assert finished_new.version == "run-b/step-00000001"
    assert order.index("new finished") < order.index("old finished")  # they ran side by side
    assert finished_old.completion_tokens == 1500
    assert replay_on_new.finish.version == "run-b/step-00000001"


def test_a_client_that_leaves_frees_its_slot_at_the_next_step(start_engine) -> None:
    engine = start_engine()
    cancelled_before = sample_value("slm_generations_total", model="run-a", reason="cancelled")

    async def scenario() -> None:
        long_story = SamplingParams(max_new_tokens=1024, temperature=0)  # no early end_of_text
        generation = await engine.submit(PROMPTS[1], long_story)
        records = generation.records()
        await anext(records)
        await records.aclose()  # what a disconnect does to the stream

    run(scenario())
    wait_for(
        lambda: (
            sample_value("slm_generations_total", model="run-a", reason="cancelled")
            == cancelled_before + 1
            and sample_value("slm_running_requests") == 0
        ),
        10,
        "the slot to be freed",
    )


def test_beyond_the_batch_and_the_queue_requests_get_429_with_retry_after(start_engine) -> None:
    engine = start_engine(max_batch_size=1, max_waiting=1)
    long_story = SamplingParams(max_new_tokens=1024, temperature=0)

    async def scenario() -> Busy:
        running = await engine.submit(PROMPTS[0], long_story)
        waiting = await engine.submit(PROMPTS[1], long_story)
        try:
            with pytest.raises(Busy) as refused:
                await engine.submit(PROMPTS[2], long_story)
        finally:
            engine.cancel(running)
            engine.cancel(waiting)
        # Cancelled requests give their places back.
        await (await engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=2))).story()
        return refused.value

    refused = run(scenario())
    assert refused.retry_after_s == 1


def test_a_story_past_its_deadline_ends_with_504(start_engine) -> None:
    engine = start_engine(request_timeout_s=0.05, max_request_tokens=200_000)

    async def scenario() -> None:
        never_ending = SamplingParams(max_new_tokens=100_000, temperature=0)
        generation = await engine.submit(PROMPTS[0], never_ending)
        await generation.story()

    with pytest.raises(DeadlinePassed) as timed_out:
        run(scenario())
    assert "REQUEST_TIMEOUT_S" in timed_out.value.message


def test_a_prompt_above_max_prompt_tokens_is_refused_naming_the_prompt(start_engine) -> None:
    engine = start_engine(max_prompt_tokens=10)

    with pytest.raises(PromptRejected) as refused:
        run(
            engine.submit(
                "one two three four five six seven eight nine ten eleven", SamplingParams()
            )
        )
    assert refused.value.message.startswith("prompt: ")


def test_the_decode_thread_keeps_its_thread_count_when_another_thread_sets_one() -> None:
    # What the reloader does: load a checkpoint on a pool thread with one torch thread, after
    # the decode thread chose its own. Torch fixes a thread's count lazily from the last value
    # any thread set, which once left the server decoding on one core.
    def decode_thread() -> int:
        use_torch_threads(2)
        loader = threading.Thread(target=use_torch_threads, args=(1,))
        loader.start()
        loader.join()
        torch.ones(1 << 20).sum()  # the first parallel op
        return torch.get_num_threads()

    counts: list[int] = []
    decoder = threading.Thread(target=lambda: counts.append(decode_thread()))
    decoder.start()
    decoder.join()
    torch.set_num_threads(torch.get_num_threads())  # the process-wide default back as it was
    assert counts == [2]
