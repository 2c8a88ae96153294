"""The decode step at fixed shapes (model.decode_step): eager at a bucket's shape, and compiled by
torch.compile in the background, each tested against today's eager step (``decode_step="off"``)
on a flat model, where batched rounding reorders near-equal tokens at every step."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from servers import api_server, metric, wait_for, write_checkpoint
from test_generate import FLAT_CASES, NEIGHBOUR_PARAMS, PROMPTS, flat_model, run_to_end

from model import GPT, preset
from model.checkpoint import load_checkpoint
from model.decode_step import COMPILED_STEPS, bucket_for, bucket_sizes, span_sizes, step_count
from model.generate import BatchGenerator
from model.sampling import SamplingParams

COMPILE_TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[1]


def rotary_flat_model() -> GPT:
    torch.manual_seed(1)
    return GPT(preset("tiny", position="rotary", norm="rmsnorm", activation="swiglu")).eval()


def compiled_generator(model: GPT, max_batch: int, **options) -> BatchGenerator:
    generator = BatchGenerator(model, max_batch=max_batch, decode_step="compiled", **options)
    assert generator.compiled_ready(COMPILE_TIMEOUT_S), "the decode step did not compile in time"
    return generator


def test_buckets_are_powers_of_two_up_to_the_batch() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]


def test_a_step_attends_over_the_cache_or_a_half_of_it_down_to_an_eighth() -> None:
    assert span_sizes(512) == (64, 128, 256, 512)
    # The tiny model's: the stories below cross from one to the other.
    assert span_sizes(64) == (32, 64)
    assert span_sizes(100) == (50, 100)
    assert span_sizes(16) == (16,)
    spans = span_sizes(512)
    assert [bucket_for(n, spans) for n in (1, 64, 65, 300, 512)] == [64, 64, 128, 512, 512]
    assert step_count(64, 512) == 7 * 4


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("make_model", [flat_model, rotary_flat_model], ids=["learned", "rotary"])
def test_seeded_stories_at_fixed_shapes_are_the_stories_of_the_eager_step(make_model, mode) -> None:
    # Six seeded stories told alone by today's step, then among nine neighbours at the fixed
    # shapes: rows come and go, so the batch is padded to every bucket on the way; the stories
    # outgrow the 64-token window (a re-encode with learned positions, a slide with rotary).
    model = make_model()
    cases = list(FLAT_CASES.values())
    stories = [(PROMPTS[seed % 4], replace(cases[seed % 5], seed=seed)) for seed in range(6)]
    alone = [run_to_end(BatchGenerator(model), [story])[0] for story in stories]
    generator = (
        compiled_generator(model, 16, prefill_tokens=64)
        if mode == "compiled"
        else BatchGenerator(model, max_batch=16, prefill_tokens=64, decode_step="eager")
    )
    crowd = [
        (PROMPTS[i % 4] + " x" * i, replace(NEIGHBOUR_PARAMS[i % 5], seed=100 + i))
        for i in range(9)
    ]
    for prompt, params in crowd[:4]:
        generator.add(generator.encode_prompt(prompt), params)
    for _ in range(3):
        generator.step()
    batched = run_to_end(generator, [*stories, *crowd[4:]])[: len(stories)]
    assert [s.generated for s in batched] == [s.generated for s in alone]
    assert all(len(s.generated) == 80 for s in alone)


def test_the_compiled_step_keeps_logprobs_stop_strings_and_greedy_choices(tokenizer) -> None:
    model = flat_model()
    params = [
        SamplingParams(max_new_tokens=40, temperature=0, logprobs=3, seed=1),
        SamplingParams(max_new_tokens=40, temperature=0.9, top_k=20, logprobs=2, seed=2),
        SamplingParams(max_new_tokens=60, temperature=1.0, stop=("e",), seed=3),
    ]
    requests = [(PROMPTS[i], p) for i, p in enumerate(params)]
    expected = run_to_end(BatchGenerator(model, max_batch=4), requests)
    got = run_to_end(compiled_generator(model, 4), requests)
    assert [s.generated for s in got] == [s.generated for s in expected]
    assert ["".join(s.text) for s in got] == ["".join(s.text) for s in expected]
    assert got[2].finish_reason == "stop"
    assert "e" not in "".join(got[2].text)
    compiled_logprobs = [e.logprob for e in _events(compiled_generator(model, 4), requests[:2])]
    eager_logprobs = [e.logprob for e in _events(BatchGenerator(model, max_batch=4), requests[:2])]
    assert len(compiled_logprobs) == 80
    for ours, theirs in zip(compiled_logprobs, eager_logprobs, strict=True):
        assert ours.token_id == theirs.token_id
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]


def _events(generator: BatchGenerator, requests):
    for prompt, params in requests:
        generator.add(generator.encode_prompt(prompt), params)
    events = []
    while generator.rows:
        events.extend(generator.step())
    return events


def test_a_model_of_the_same_shape_reuses_the_compiled_step_with_its_own_weights() -> None:
    first = flat_model()
    compiled_generator(first, 4)
    compiled = COMPILED_STEPS.compiled_count()
    torch.manual_seed(7)
    second = GPT(preset("tiny")).eval()  # a reload: same shape, new weights
    generator = BatchGenerator(second, max_batch=4, decode_step="compiled")
    assert generator.compiled_ready(timeout=0)  # ready at once: nothing compiles again
    assert COMPILED_STEPS.compiled_count() == compiled
    requests = [(PROMPTS[i], replace(FLAT_CASES["plain"], seed=i)) for i in range(3)]
    ours = [s.generated for s in run_to_end(generator, requests)]
    assert ours == [s.generated for s in run_to_end(BatchGenerator(second, max_batch=4), requests)]
    assert ours != [s.generated for s in run_to_end(BatchGenerator(first, max_batch=4), requests)]


# Stories from the compiled step and from today's, in a process of its own (printed as JSON).
COMPILE_ERROR_SCRIPT = """
import json, logging, sys, torch
sys.path.insert(0, "tests")
from test_generate import FLAT_CASES, PROMPTS, run_to_end
from dataclasses import replace
from model import GPT, preset
from model.generate import BatchGenerator
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
torch.manual_seed(3)
model = GPT(preset("tiny")).eval()
requests = [(PROMPTS[i], replace(FLAT_CASES["top-k"], seed=i)) for i in range(3)]
compiled = BatchGenerator(model, max_batch=4, decode_step="compiled")
ready = compiled.compiled_ready(300)
stories = {
    mode: [s.generated for s in run_to_end(generator, requests)]
    for mode, generator in (("compiled", compiled), ("off", BatchGenerator(model, max_batch=4)))
}
print(json.dumps({"ready": ready, **stories}))
"""


def test_a_compile_error_leaves_the_step_eager_and_is_logged_once(tmp_path) -> None:
    # A host without a C++ compiler (a slim image): inductor cannot build its kernels. A fresh
    # cache, so none from an earlier compile stands in for them.
    env = {
        "PATH": str(Path(sys.executable).parent),  # python, and no g++
        "HOME": str(tmp_path),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ERROR_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stories = json.loads(done.stdout)
    assert stories["ready"]
    assert stories["compiled"] == stories["off"]
    assert all(len(story) == 80 for story in stories["off"])
    lines = done.stderr.splitlines()
    failures = [line for line in lines if "compiling the decode step failed" in line]
    assert len(failures) == 1, done.stderr[-3000:]
    assert "C++ compiler" in done.stderr


def test_the_service_serves_eager_at_once_and_the_same_stories_once_compiled(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    write_checkpoint(root / "run-a")
    env = {"CHECKPOINT_DIR": str(root), "COMPILE_DECODE": "true", "MAX_BATCH_SIZE": "2"}
    body = {"prompt": "Once upon a time", "max_new_tokens": 30, "seed": 5, "stream": False}
    model, _ = load_checkpoint(root / "run-a")
    story = SamplingParams(max_new_tokens=30, temperature=0.8, top_k=200, seed=5)  # the defaults
    (expected,) = run_to_end(BatchGenerator(model.eval()), [(body["prompt"], story)])
    with (
        api_server(env, tmp_path, ready_path="/ready", cli=True) as server,
        server.client() as client,
    ):
        early = client.post("/generate", json=body)
        assert early.status_code == 200, early.text

        def compiled_steps() -> float:
            return metric(client.get("/metrics").text, "slm_compiled_decode_steps")

        steps = step_count(2, 64)
        wait_for(lambda: compiled_steps() >= steps, COMPILE_TIMEOUT_S, "every step to compile")
        late = client.post("/generate", json=body)
    assert late.status_code == 200, late.text
    assert early.json()["token_ids"] == late.json()["token_ids"] == expected.generated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_on_cuda_the_fixed_step_and_its_cuda_graphs_tell_the_eager_stories(mode) -> None:
    model = flat_model().cuda()
    requests = [(PROMPTS[i % 4], replace(FLAT_CASES["top-k"], seed=i)) for i in range(6)]
    expected = [s.generated for s in run_to_end(BatchGenerator(model, max_batch=8), requests)]
    generator = (
        compiled_generator(model, 8)
        if mode == "compiled"
        else BatchGenerator(model, max_batch=8, decode_step="eager")
    )
    assert [s.generated for s in run_to_end(generator, requests)] == expected
    if mode == "compiled":  # the steps ran as CUDA graphs, not eager
        assert generator._cuda_graphs is not None


def compiled_regions(generator: BatchGenerator) -> int:
    """How many of one step's operations ran in compiled code (the profiler's record)."""
    with torch.profiler.profile() as profiler:
        generator.step()
    return sum("Compiled" in event.name for event in profiler.events())


@pytest.mark.parametrize("inference", [False, True], ids=["built-normally", "in-inference-mode"])
def test_the_steps_run_compiled_once_ready_however_the_generator_was_built(inference) -> None:
    # Guards tell inference tensors from others: a step compiled for the wrong kind would run
    # eager for ever, every story still right.
    with torch.inference_mode(inference):  # as the service's decode thread builds them
        generator = compiled_generator(flat_model(), 4)
        for seed in range(3):
            generator.add([1, 2, 3], replace(FLAT_CASES["plain"], seed=seed))
        generator.step()  # the prefill
        assert compiled_regions(generator) > 0  # over the shortest span, 32 slots
        for _ in range(30):
            generator.step()
        assert compiled_regions(generator) > 0  # past 32 slots: over the whole cache's 64
    eager = BatchGenerator(flat_model(), max_batch=4, decode_step="eager")
    eager.add([1, 2, 3], FLAT_CASES["plain"])
    eager.step()
    assert compiled_regions(eager) == 0


def test_the_steps_run_compiled_on_the_generators_thread_count_whoever_calls_them() -> None:
    # As in the service: built on one thread with one torch thread (the reloader), stepped on
    # another with a different count (the decode thread). A compiled step's guards check the
    # count: were the step to run on the caller's, it would run eager for ever.
    built: dict[str, BatchGenerator] = {}

    def build() -> None:
        torch.set_num_threads(1)
        built["generator"] = compiled_generator(flat_model(), 4, threads=2)

    builder = threading.Thread(target=build)
    builder.start()
    builder.join()
    generator = built["generator"]
    callers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(3):
            generator.add([1, 2, 3], replace(FLAT_CASES["plain"], seed=seed))
        generator.step()  # the prefill
        assert compiled_regions(generator) > 0
        assert torch.get_num_threads() == 1  # the caller's count, restored
    finally:
        torch.set_num_threads(callers)
