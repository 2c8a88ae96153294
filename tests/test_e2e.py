"""The whole loop as a user runs it, with `slm up` (an embedded Redis, a real worker process, the
API under uvicorn): POST a training job → progress → a checkpoint → the API hot-loads it →
a story streams from it → /metrics counts it; a later checkpoint of the same job replaces the
first while streams run, and none fails. Then the web playground in headless Chromium, and
Ctrl-C stopping everything."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import (
    Stack,
    metric,
    sse_events,
    start_stack,
    stop_stack,
    wait_for,
    write_checkpoint,
)
from weights import sharp_model

from model import preset
from model.checkpoint import save_checkpoint
from service.schemas import GenerateRequest

CHROMIUM = Path("/usr/bin/chromium")
JOB = {
    "run_name": "e2e",
    "data": {"dataset": "stories"},
    "train": {
        "preset": "tiny",
        "max_steps": 150,
        "batch_size": 8,
        "block_size": 64,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_steps": 10,
        "eval_interval": 25,
        "eval_iters": 2,
        "checkpoint_interval": 25,
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, train_data) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("up"), train_data)
    try:
        yield stack
    finally:
        stop_stack(stack)


def stream_story(base_url: str, **request) -> tuple[str, dict]:
    """POST /generate and read its SSE stream: the joined text and the final event."""
    pieces, final = [], None
    body = {"prompt": "Once upon a time", "stream": True, **request}
    with httpx.stream("POST", base_url + "/generate", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for event, data in sse_events(response):
            if event == "token":
                pieces.append(json.loads(data)["text"])
            elif event == "done":
                final = json.loads(data)
            elif event == "error":
                raise AssertionError(f"the stream failed: {data}")
    assert final is not None, "the stream ended without its final event"
    return "".join(pieces), final


def job_status(client: httpx.Client, job_id: str) -> dict:
    response = client.get(f"/train-jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def ready_version(client: httpx.Client) -> str | None:
    response = client.get("/ready")
    return response.json()["model"] if response.status_code == 200 else None


def test_train_job_to_streamed_story_with_hot_reload(stack: Stack) -> None:
    client = httpx.Client(base_url=stack.base_url, timeout=30)

    # Nothing trained yet: the service is up and says how to get a model.
    assert client.get("/ready").status_code == 503
    refused = client.post("/generate", json={"prompt": "Hi", "stream": False})
    assert refused.status_code == 503 and "train" in refused.json()["error"]["message"]

    submitted = client.post("/train-jobs", json=JOB)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"].endswith(f"/train-jobs/{job_id}")

    steps_seen = set()

    def training_advanced() -> bool:
        steps_seen.add(job_status(client, job_id)["step"])
        return len(steps_seen - {0}) >= 2

    wait_for(training_advanced, 90, "the job's step to advance", interval=0.2)

    first_version = wait_for(lambda: ready_version(client), 60, "the first checkpoint to load")
    assert first_version.startswith("e2e/")
    text, final = stream_story(stack.base_url, max_new_tokens=40, seed=1, temperature=0.8)
    assert text and final["usage"]["completion_tokens"] > 0
    assert final["model"].startswith("e2e/")

    # Streams run back to back until one of them straddles a reload: it started on one version,
    # a newer one was loaded while it ran, and it still finished on the one it started with.
    # (version loaded before, version that served it, version loaded after, finish reason)
    outcomes: list[tuple[str, str, str, str]] = []
    failures: list[BaseException] = []
    straddled = threading.Event()

    def keep_streaming() -> None:
        own = httpx.Client(base_url=stack.base_url, timeout=30)
        while not straddled.is_set():
            before = ready_version(own)
            try:
                _, done = stream_story(stack.base_url, max_new_tokens=600, temperature=1.0)
            except BaseException as error:  # recorded and asserted on below
                failures.append(error)
                return
            after = ready_version(own)
            outcomes.append((before, done["model"], after, done["finish_reason"]))
            if before == done["model"] and after != before:
                straddled.set()

    streams = [threading.Thread(target=keep_streaming) for _ in range(3)]
    for thread in streams:
        thread.start()
    finished = straddled.wait(120)
    straddled.set()
    for thread in streams:
        thread.join(60)
    assert not failures, failures
    assert finished, f"no stream straddled a reload: {outcomes}"
    # Every stream was served by the version loaded when it started, or a newer one (it may
    # have been queued across a reload), never an older one.
    assert all(served >= before for before, served, _, _ in outcomes), outcomes

    final_progress = wait_for(
        lambda: (p := job_status(client, job_id))["state"] in {"finished", "failed"} and p,
        300,  # a bound, not a speed test: the job shares two cores with the streams above
        "the job to finish",
        interval=0.5,
    )
    assert final_progress["state"] == "finished", final_progress
    assert final_progress["step"] == JOB["train"]["max_steps"]
    assert wait_for(
        lambda: ready_version(client) == final_progress["last_checkpoint"],
        30,
        "the last checkpoint to be served",
    )

    metrics = client.get("/metrics").text
    assert (
        metric(metrics, 'slm_generated_tokens_total{model="e2e"}')
        >= final["usage"]["completion_tokens"]
    )
    assert metric(metrics, 'slm_reloads_total{outcome="loaded"}') >= 2


# CI installs Debian's chromium (.ci/run): there a missing browser is a failure, not a skip.
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)


@needs_chromium
def test_playground_in_a_browser(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    client = httpx.Client(base_url=stack.base_url, timeout=30)
    if ready_version(client) is None:  # run alone: give the page a model to write with
        # (a short job, so that the worker is free for the page's own job soon)
        train = {**JOB["train"], "max_steps": 50}
        client.post("/train-jobs", json={**JOB, "run_name": "page-model", "train": train})
        wait_for(lambda: ready_version(client), 120, "a model to load")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(stack.base_url + "/")
            expect(page.locator("#model-status")).to_contain_text("Model", timeout=15_000)

            page.get_by_label("Prompt").fill("Once upon a time there was a cat")
            page.get_by_label("Max new tokens").fill("1000")
            page.get_by_label("Temperature").fill("1")
            story, info = page.locator("#story-text"), page.locator("#story-info")
            # A trained model may end its story (<|endoftext|>) before Stop is pressed: then
            # write another, until one is caught running.
            for _ in range(8):
                page.evaluate(
                    """() => {
                        window.storyUpdates = 0;
                        new MutationObserver(() => window.storyUpdates++).observe(
                            document.getElementById("story-text"),
                            {childList: true, characterData: true, subtree: true});
                    }"""
                )
                page.get_by_role("button", name="Generate").click()
                # It grows, unless the story is over within a couple of tokens.
                page.wait_for_function(
                    "() => window.storyUpdates >= 3"
                    " || document.getElementById('story-info').textContent !== 'Writing…'",
                    timeout=15_000,
                )
                grew = page.evaluate("window.storyUpdates") >= 3
                # If the story ended first, Stop is disabled again and the click times out.
                with contextlib.suppress(PlaywrightTimeout):
                    page.get_by_role("button", name="Stop", exact=True).click(timeout=2_000)
                expect(info).not_to_have_text("Writing…", timeout=10_000)
                if grew and info.text_content() == "Stopped.":
                    break
            else:
                raise AssertionError(f"no story was still running to stop: {info.text_content()}")
            stopped_at = len(story.text_content())
            time.sleep(0.5)
            assert len(story.text_content()) == stopped_at
            # The server dropped the story from its batch when the connection closed.
            wait_for(
                lambda: metric(client.get("/metrics").text, "slm_running_requests") == 0,
                10,
                "the stopped story to leave the batch",
            )

            page.get_by_label("Run name").fill("browser")
            check_the_data_field(page, client)
            page.get_by_label("Data: a dataset in DATA_DIR, hub:v2 or a URL").fill("stories")
            page.locator("select[name=preset]").select_option("tiny")  # seconds, not minutes
            page.get_by_label("Steps").fill("60")
            page.get_by_label("Eval every").fill("10")
            page.evaluate(
                """() => {
                    window.jobStatuses = [];
                    const status = document.getElementById("job-status");
                    new MutationObserver(() => window.jobStatuses.push(status.textContent))
                        .observe(status, {childList: true, characterData: true, subtree: true});
                }"""
            )
            page.get_by_role("button", name="Start training").click()
            expect(page.locator("#job-status")).to_contain_text("step", timeout=15_000)
            # The list follows the server without a reload: training, stopped, resumed.
            jobs = page.locator("#jobs")
            expect(jobs).to_contain_text("browser — training", timeout=150_000)
            # While it trains the panel says how fast and how long is left.
            expect(page.locator("#job-status")).to_contain_text("tokens/s", timeout=90_000)
            expect(page.locator("#job-status")).to_contain_text(" left")
            page.get_by_role("button", name="Stop job").click()
            expect(page.locator("#job-status")).to_contain_text("stopped", timeout=60_000)
            expect(jobs).to_contain_text("browser — stopped", timeout=5_000)
            page.get_by_role("button", name="Resume job").click()
            expect(jobs).not_to_contain_text("browser — stopped", timeout=5_000)
            expect(page.locator("#job-status")).to_contain_text("finished", timeout=240_000)
            expect(jobs).to_contain_text("browser — finished", timeout=5_000)
            statuses = page.evaluate("window.jobStatuses")
            assert not [text for text in statuses if "?" in text], statuses
            check_the_loss_chart(page)
            drawn = page.evaluate(
                """() => {
                    const canvas = document.getElementById("loss-chart");
                    const pixels = canvas.getContext("2d")
                        .getImageData(0, 0, canvas.width, canvas.height).data;
                    let inked = 0;
                    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked++;
                    return inked;
                }"""
            )
            assert drawn > 500, "the loss chart drew nothing"
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            assert (tmp_path / "playground.png").stat().st_size > 10_000

            # A phone, touch only: a tap on a job in the list opens it (nothing lies over the
            # list), and at 360 and 390 px nothing scrolls sideways, with the API key's field
            # open and the job's chart shown.
            phone = browser.new_context(
                viewport={"width": 360, "height": 740}, has_touch=True, is_mobile=True
            )
            mobile = phone.new_page()
            mobile.goto(stack.base_url + "/")
            mobile.locator("details.key summary").tap()
            mobile.locator("#jobs button", has_text="browser").tap(timeout=10_000)
            expect(mobile.locator("#job-status")).to_contain_text("finished", timeout=10_000)
            for width in (360, 390):
                mobile.set_viewport_size({"width": width, "height": 740})
                assert_no_sideways_scroll(mobile, width)
            check_the_data_field(mobile, client)  # at 390 px
            assert_no_sideways_scroll(mobile, 390)
        finally:
            browser.close()


@needs_chromium
def test_playground_writes_with_the_picked_run(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    # run-a saves last, so it is the newest run: run-b writes only if the request names it.
    # run-gone is listed, then deleted before anyone asked for it. It is saved aside and moved
    # in last, so it is never the newest run (which the service would load at once).
    # run-val's checkpoint recorded a val loss, which the picker shows; it is moved in like
    # run-gone, so it is not the newest run either.
    write_checkpoint(tmp_path / "run-gone", seed=2)
    save_checkpoint(
        tmp_path / "run-val", sharp_model(preset("tiny"), seed=4), step=7, val_loss=2.3456
    )
    version_b = write_checkpoint(stack.checkpoint_dir / "run-b", seed=1)
    version_a = write_checkpoint(stack.checkpoint_dir / "run-a", seed=0)
    shutil.move(tmp_path / "run-gone", stack.checkpoint_dir / "run-gone")
    shutil.move(tmp_path / "run-val", stack.checkpoint_dir / "run-val")
    val_run = "option[value='run-val']"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(stack.base_url + "/")
            picker = page.get_by_label("Run", exact=True)
            for version in (version_a, version_b):
                run, checkpoint = version.split("/")
                expect(picker.locator(f"option[value='{run}']")).to_have_text(
                    f"{run} ({checkpoint})"
                )
            expect(picker).to_have_value("")  # "Newest run": the request names no model
            # A run whose latest checkpoint has a val loss shows it next to its name.
            expect(picker.locator(val_run)).to_have_text("run-val (step-00000007) — val loss 2.346")
            # The sampling inputs start at POST /generate's defaults: one set, the API's.
            fields = GenerateRequest.model_fields
            expect(page.get_by_label("Temperature")).not_to_have_value("")
            for label, name in (
                ("Temperature", "temperature"),
                ("Top-k", "top_k"),
                ("Top-p", "top_p"),
                ("Max new tokens", "max_new_tokens"),
            ):
                shown = float(page.get_by_label(label).input_value())
                assert shown == fields[name].default, (label, shown)

            picker.select_option("run-b")
            page.get_by_label("Max new tokens").fill("8")
            with page.expect_request(lambda request: request.url.endswith("/generate")) as sent:
                page.get_by_role("button", name="Generate").click()
            assert sent.value.post_data_json["model"] == "run-b"
            info = page.locator("#story-info")
            expect(info).to_contain_text(f"model {version_b},", timeout=30_000)
            expect(page.locator("#story-text")).not_to_be_empty()
            replay_a_seed(page, "run-b")
            check_the_story_history(page)

            # A run deleted since the picker listed it: the server's 404 message is shown, and
            # the picker drops it (back to the newest run).
            shutil.rmtree(stack.checkpoint_dir / "run-gone")
            picker.select_option("run-gone")
            page.get_by_role("button", name="Generate").click()
            expect(info).to_contain_text("no run 'run-gone'")
            expect(picker.locator("option[value='run-gone']")).to_have_count(0)
            expect(picker).to_have_value("")

            # A phone: the picker is there and nothing scrolls sideways.
            page.set_viewport_size({"width": 390, "height": 844})
            expect(picker).to_be_visible()
            expect(picker.locator(val_run)).to_have_text("run-val (step-00000007) — val loss 2.346")
            scrolled, shown = page.locator("html").evaluate(
                "(root) => [root.scrollWidth, root.clientWidth]"
            )
            assert scrolled <= shown, f"the page is {scrolled} px wide in a {shown} px window"
            replay_a_seed(page, "run-b")
            check_the_name_fields(page, stack.base_url)
            check_the_colour_schemes(browser, stack.base_url)

            # A phone, touch only, 360 px wide, and the newest run has the longest name a run
            # may have, in one word: the page wraps it, and nothing scrolls sideways.
            long_run = "Storyteller" * 5 + "Wordsmith"
            write_checkpoint(stack.checkpoint_dir / long_run, seed=3)
            phone = browser.new_context(
                viewport={"width": 360, "height": 740}, has_touch=True, is_mobile=True
            )
            mobile = phone.new_page()
            mobile.goto(stack.base_url + "/")
            expect(mobile.locator("#model-status")).to_contain_text(long_run, timeout=20_000)
            mobile.locator("details.key summary").tap()
            expect(mobile.get_by_label("Run", exact=True)).to_be_visible()
            for width in (360, 390):
                mobile.set_viewport_size({"width": width, "height": 740})
                assert_no_sideways_scroll(mobile, width)
        finally:
            browser.close()


@needs_chromium
def test_playground_trains_a_chosen_shape(stack: Stack) -> None:
    """The Train panel's Advanced section: what is set there (1 layer, rotary positions) goes
    into the job's spec and nothing else does (the preset decides the rest); a shape the model
    cannot have is refused with the API's message, on a desktop and on a 390 px phone. On the
    desktop the job also trains with Muon for a time budget (minutes instead of steps)."""
    from playwright.sync_api import expect, sync_playwright

    client = httpx.Client(base_url=stack.base_url, timeout=30)
    accepted = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            for width, run in ((1280, "shaped"), (390, "shaped-phone")):
                context = browser.new_context(
                    viewport={"width": width, "height": 900},
                    has_touch=width < 480,
                    is_mobile=width < 480,
                )
                page = context.new_page()
                page.goto(stack.base_url + "/")
                advanced = page.locator("#train-advanced")
                layers = page.get_by_label("Layers")
                expect(layers).to_be_hidden()  # closed until asked for
                advanced.locator("summary").click()
                for label in (
                    "Layers",
                    "Heads",
                    "Width",
                    "Bias",
                    "Position encoding",
                    "Normalisation",
                    "MLP activation",
                    "QK-norm",
                    "Tied output head",
                    "Pad vocabulary",
                ):
                    expect(page.get_by_label(label)).to_have_value("")
                expect(page.get_by_role("combobox", name="Optimizer")).to_have_value("muon")
                if width < 480:
                    assert_no_sideways_scroll(page, width)  # the open section fits a phone

                page.get_by_label("Run name").fill(run)
                page.get_by_label("Data: a dataset in DATA_DIR, hub:v2 or a URL").fill("stories")
                page.get_by_label("Steps").fill("20")
                layers.fill("1")
                page.get_by_label("Position encoding").select_option("rotary")
                budget = {}
                if width >= 480:  # AdamW alone, for two minutes instead of the steps
                    page.get_by_role("combobox", name="Optimizer").select_option("adamw")
                    page.get_by_label("Or a time budget, minutes").fill("2")
                    expect(page.get_by_label("Steps")).to_be_disabled()
                    budget = {"optimizer": "adamw", "max_minutes": 2}
                with page.expect_response(
                    lambda response: (
                        response.url.endswith("/train-jobs") and response.request.method == "POST"
                    )
                ) as answer:
                    page.get_by_role("button", name="Start training").click()
                assert answer.value.status == 202, answer.value.text()
                sent = answer.value.request.post_data_json["train"]
                assert (sent["n_layer"], sent["position"]) == (1, "rotary"), sent
                assert not {"n_head", "n_embd", "norm", "activation", "qk_norm"} & set(sent), sent
                assert {name: sent.get(name) for name in budget} == budget, sent
                assert ("max_steps" in sent) is not bool(budget), sent  # one length, not both
                job_id = answer.value.json()["id"]
                accepted.append(job_id)
                expect(page.locator("#jobs")).to_contain_text(run, timeout=10_000)
                train = job_status(client, job_id)["spec"]["train"]
                assert (train["n_layer"], train["position"]) == (1, "rotary"), train
                assert train["n_head"] is None and train["norm"] is None, train
                assert train["optimizer"] == budget.get("optimizer", "muon"), train
                assert train["max_minutes"] == budget.get("max_minutes"), train

                # A width the heads do not divide: the API's refusal, shown in the page.
                page.get_by_label("Run name").fill(run + "-bad")
                page.get_by_label("Width").fill("100")
                page.get_by_label("Heads").fill("3")
                page.get_by_role("button", name="Start training").click()
                expect(page.locator("#train-error")).to_contain_text(
                    "n_embd (100) must be divisible by n_head (3)"
                )
                if width < 480:
                    for narrow in (360, 390):
                        page.set_viewport_size({"width": narrow, "height": 900})
                        assert_no_sideways_scroll(page, narrow)
                context.close()
        finally:
            browser.close()
            for job_id in accepted:  # the worker is free for the other tests
                client.delete(f"/train-jobs/{job_id}")


def assert_no_sideways_scroll(page, width: int) -> None:
    """At ``width`` px the page fits the window (a phone's browser would otherwise zoom out, so
    innerWidth grows with the page)."""
    scrolled, window = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    assert scrolled <= window == width, f"the page is {scrolled} px wide in a {width} px window"


def check_the_data_field(page, client: httpx.Client) -> None:
    """The data field starts at a prepared dataset, offers the server's prepared datasets with
    their size and the hub's TinyStories, and says what each will train on (hub:v2: a download
    of about 2.2 GB, tokenized by the worker first); a job that failed for its data says so in
    the page's terms, not the command line's (no --source)."""
    from playwright.sync_api import expect

    field = page.get_by_label("Data: a dataset in DATA_DIR, hub:v2 or a URL")
    note = page.locator("#dataset-note")
    listed = client.get("/datasets").json()["datasets"]
    assert [dataset["name"] for dataset in listed] == ["stories"], listed
    tokens = sum(listed[0]["tokens"].values())
    expect(field).to_have_value("stories")  # not hub:v2, which needs the hub
    options = page.locator("#datasets option")
    expect(options.first).to_have_attribute("value", "stories")
    label = options.first.get_attribute("label")
    shown = re.fullmatch(r"stories — ([\d.]+)([kMB]?) tokens", label)
    assert shown, label
    scale = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9}[shown[2]]
    assert abs(float(shown[1]) * scale - tokens) <= 0.05 * scale, (label, tokens)
    expect(page.locator("#datasets option[value='hub:v2']")).to_have_count(1)
    expect(note).to_contain_text("Prepared on the server")
    expect(field).to_have_attribute("aria-describedby", "dataset-note")

    field.fill("hub:v2")
    expect(note).to_contain_text("TinyStories v2")
    expect(note).to_contain_text("Hugging Face hub")
    expect(note).to_contain_text("2.2 GB")
    expect(note).to_contain_text("tokenizes before training")
    field.fill("no-such-data")
    expect(note).to_contain_text("No prepared dataset 'no-such-data'")
    field.fill("stories")
    expect(note).to_contain_text("Prepared on the server")

    for message, said in (
        (
            "cannot fetch TinyStoriesV2-GPT4-train.txt from the Hugging Face hub "
            "(roneneldan/TinyStories): offline — without the hub, pass --source a local file "
            "or folder, or an http(s) URL",
            "could not download TinyStoriesV2-GPT4-train.txt from the Hugging Face hub",
        ),
        (
            "dataset 'gone' is not prepared under DATA_DIR (/data): /data/gone has no "
            "manifest.json. Prepare it with `slm prepare --source SOURCE --out /data/gone`, or "
            "submit the job with data.source (hub:v2, hub:v1 or an http(s) URL) instead of "
            "data.dataset, which the worker prepares first",
            "the dataset 'gone' is not prepared on the server",
        ),
    ):
        job = {"state": "failed", "step": 0, "run_name": "x", "message": message}
        text = page.evaluate("(job) => describeJob(job)", job)
        assert said in text and "--source" not in text and "slm prepare" not in text, text
        assert "Data field" in text, text


def check_the_loss_chart(page) -> None:
    """The loss axis is labelled at round values between its ends, the right-hand axis gives
    them in val bits per byte, and a series of one point (the first evaluation) shows as a
    dot."""
    drawn = page.evaluate(
        """() => {
            const canvas = document.createElement("canvas");
            canvas.width = 640;
            canvas.height = 280;
            const context = canvas.getContext("2d");
            const labels = [];
            const fillText = context.fillText;
            context.fillText = (text, x, y) => {
                labels.push([String(text), x]);
                fillText.call(context, text, x, y);
            };
            drawLosses(canvas, [
                {step: 0, train_loss: 10.8},
                {step: 10, train_loss: 9.1, val_loss: 9.4, val_bits_per_byte: 3.29},
                {step: 20, train_loss: 8.2},
            ]);
            const val = getComputedStyle(document.documentElement).getPropertyValue("--val");
            context.fillStyle = val.trim();
            context.fillRect(0, 0, 1, 1);  // the val colour as the canvas stores it
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let valInk = -1;  // less the reference pixel
            for (let i = 0; i < pixels.length; i += 4) {
                if (pixels[i] === pixels[0] && pixels[i + 1] === pixels[1]
                    && pixels[i + 2] === pixels[2] && pixels[i + 3] === 255) valInk++;
            }
            return {labels, valInk};
        }"""
    )
    # The loss labels are the numbers left of the plot (which starts 48 px in).
    losses = {
        float(text) for text, x in drawn["labels"] if x < 48 and re.fullmatch(r"[\d.]+", text)
    }
    assert len(losses) >= 4, drawn["labels"]
    # Bits per byte are the numbers right of the plot (which ends 44 px from the edge).
    bits = [float(text) for text, x in drawn["labels"] if x > 640 - 44 and text[0].isdigit()]
    assert bits == pytest.approx([loss * 3.29 / 9.4 for loss in sorted(losses)], abs=0.006)
    assert drawn["valInk"] >= 20, drawn


def check_the_story_history(page) -> None:
    """The stories written in this browser are kept across a reload: one can be copied, or
    written again with the same settings (the same story, its seed given), and the whole list
    downloaded as text or JSON, or cleared."""
    from playwright.sync_api import expect

    history = page.locator("#history li")
    written = history.count()
    assert written >= 3, written  # the picked run's story and the replay's two
    newest = (
        page.locator("#story-prompt").text_content() + page.locator("#story-text").text_content()
    )
    page.reload()
    expect(history).to_have_count(written)
    expect(history.first).to_contain_text(newest[-20:])
    expect(page.get_by_label("Run", exact=True).locator("option[value='run-b']")).to_have_count(1)

    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    history.first.get_by_role("button", name="Copy").click()
    expect(page.locator("#history-note")).to_have_text("Copied the story.")
    assert page.evaluate("navigator.clipboard.readText()") == newest

    kept = page.evaluate("JSON.parse(localStorage.getItem('slm-stories'))[0]")
    assert kept["request"]["model"] == "run-b" and "seed" in kept["request"], kept
    with page.expect_request(lambda request: request.url.endswith("/generate")) as sent:
        history.first.get_by_role("button", name="Write again").click()
    body = sent.value.post_data_json
    assert {name: body.get(name) for name in kept["request"]} == kept["request"], body
    expect(history).to_have_count(written + 1, timeout=30_000)
    again = page.evaluate("JSON.parse(localStorage.getItem('slm-stories'))[0]")
    assert (again["text"], again["seed"]) == (kept["text"], kept["seed"])

    with page.expect_download() as as_text:
        page.get_by_role("button", name="Download text").click()
    assert newest in Path(as_text.value.path()).read_text()
    with page.expect_download() as as_json:
        page.get_by_role("button", name="Download JSON").click()
    stories = json.loads(Path(as_json.value.path()).read_text())
    assert len(stories) == written + 1 and stories[0]["prompt"] + stories[0]["text"] == newest

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Clear").click()
    expect(history).to_have_count(0)
    page.reload()
    expect(history).to_have_count(0)
    page.get_by_label("Seed", exact=True).fill("")


def check_the_colour_schemes(browser, base_url: str) -> None:
    """The page follows the system's colour scheme: dark ink on a light ground, or in dark mode
    light ink on a dark ground, its panels and fields too."""

    def luminance(colour: str) -> float:
        red, green, blue = (int(part) for part in re.findall(r"\d+", colour)[:3])
        return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255

    for scheme, width in (("light", 1280), ("dark", 1280), ("dark", 390)):
        context = browser.new_context(color_scheme=scheme, viewport={"width": width, "height": 844})
        page = context.new_page()
        page.goto(base_url + "/")
        colours = page.evaluate(
            """() => ["body", ".story", "textarea", "canvas"].map((selector) => {
                const style = getComputedStyle(document.querySelector(selector));
                return [selector, style.backgroundColor, style.color];
            })"""
        )
        for selector, background, ink in colours:
            if scheme == "dark":
                assert luminance(background) < 0.25 < 0.6 < luminance(ink), (selector, colours)
            else:
                assert luminance(background) > 0.8 > 0.3 > luminance(ink), (selector, colours)
        context.close()


def check_the_name_fields(page, base_url: str) -> None:
    """The run-name and dataset fields check themselves in the browser (with patterns Chromium
    compiles) and say the rule; the server's refusal says it too, not a regular expression."""
    from playwright.sync_api import expect

    rule = "letters, digits and '-', at most 64 characters, starting and ending with a letter"
    run_name = page.get_by_label("Run name")
    dataset = page.get_by_label("Data: a dataset in DATA_DIR, hub:v2 or a URL")
    # Chromium shows the title under its "Please match the requested format."
    mismatch = "(input) => [input.validity.patternMismatch, input.title]"
    for field, value, valid in (
        (run_name, "my-run-2", True),
        (run_name, "7", True),
        (run_name, "-bad", False),
        (run_name, "a/b", False),
        (run_name, "bad-", False),
        (dataset, "stories", True),
        (dataset, "hub:v2", True),
        (dataset, "https://example.com/stories.txt", True),
        (dataset, "../etc", False),
    ):
        field.fill(value)
        refused, message = field.evaluate(mismatch)
        assert refused is not valid, (value, refused, message)
        if not valid:
            assert rule in message.lower(), message
    dataset.fill("stories")
    run_name.fill("-bad")
    sent = []
    page.on("request", lambda request: sent.append(request.url))
    page.get_by_role("button", name="Start training").click()
    page.wait_for_timeout(300)
    assert not [url for url in sent if url.endswith("/train-jobs")], sent
    expect(page.locator("#train-error")).to_be_empty()
    run_name.fill("playground")

    spec = {**JOB, "run_name": "-bad"}
    for body, field in ((spec, "run_name"), ({**JOB, "data": {"dataset": "../x"}}, "data.dataset")):
        response = httpx.post(base_url + "/train-jobs", json=body, timeout=30)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == field and f"{field}: must be {rule}" in error["message"], error
        assert "[A-Za-z" not in error["message"], error


def replay_a_seed(page, run: str) -> None:
    """Write a story with a random seed, then write again with the seed the page showed: the
    same story (a seed above 2**53 would have been shown, and sent back, rounded)."""
    from playwright.sync_api import expect

    page.get_by_label("Run", exact=True).select_option(run)
    page.get_by_label("Max new tokens").fill("24")
    seed_input = page.get_by_label("Seed", exact=True)
    generate = page.get_by_role("button", name="Generate")
    info, story = page.locator("#story-info"), page.locator("#story-text")
    seed_input.fill("")
    generate.click()
    expect(generate).to_be_enabled(timeout=30_000)
    shown = re.search(r"model (\S+), seed (\d+)$", info.text_content())
    assert shown, info.text_content()
    first = story.text_content()
    assert first
    seed_input.fill(shown[2])
    with page.expect_request(lambda request: request.url.endswith("/generate")) as sent:
        generate.click()
    assert sent.value.post_data_json["seed"] == int(shown[2])
    expect(generate).to_be_enabled(timeout=30_000)
    expect(info).to_contain_text(f"model {shown[1]}, seed {shown[2]}")
    assert story.text_content() == first, (shown[2], first, story.text_content())
    seed_input.fill("")


def test_ctrl_c_stops_every_process(tmp_path: Path, train_data: Path) -> None:
    stack = start_stack(tmp_path, train_data)
    redis_file = tmp_path / ".slm" / "redis" / "redis.json"
    redis_url = json.loads(redis_file.read_text())["url"]
    assert stop_stack(stack) == 0, stack.output()
    assert not redis_file.exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(stack.base_url + "/health", timeout=1)
    leftovers = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and str(stack.checkpoint_dir).encode() in _environ(pid)
    ]
    assert not leftovers, f"processes left running: {leftovers}"
    import redis

    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=0.5).ping()


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""
