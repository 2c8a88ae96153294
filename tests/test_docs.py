"""What a newcomer reads first: the API's own docs at /docs and /redoc, which must render on a
machine with no internet (their scripts and styles come from this server, not a CDN), and the
advice the service gives before any model exists."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ApiServer, api_server

CHROMIUM = Path("/usr/bin/chromium")
# CI installs Debian's chromium (.ci/run): there a missing browser is a failure, not a skip.
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("docs")
    (root / "checkpoints").mkdir()
    env = {"CHECKPOINT_DIR": str(root / "checkpoints"), "DATA_DIR": str(root / "data")}
    with api_server(env, root) as server:
        yield server


def asset_urls(html: str) -> list[str]:
    """The scripts, styles and icons a docs page loads."""
    return re.findall(r'<(?:script|link)[^>]*\b(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_their_assets_from_this_server(api: ApiServer, page: str) -> None:
    with api.client() as client:
        response = client.get(page)
        assert response.status_code == 200
        urls = asset_urls(response.text)
        assert any(url.endswith(".js") for url in urls), urls
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url


@needs_chromium
def test_the_docs_render_in_a_browser_with_no_internet(api: ApiServer) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    elsewhere: list[tuple[str, str]] = []  # (resource type, URL) of each request aborted

    def only_this_server(route: Route) -> None:
        url = route.request.url
        if url.startswith(api.base_url + "/"):
            route.continue_()
        else:
            elsewhere.append((route.request.resource_type, url))
            route.abort("internetdisconnected")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route("**/*", only_this_server)

            page.goto(api.base_url + "/docs")
            generate = page.locator('.opblock-post [data-path="/generate"]')
            expect(generate).to_be_visible(timeout=15_000)
            expect(page.locator(".opblock-get [data-path='/train-jobs']")).to_be_visible()
            generate.click()  # an operation opens, with its request body's schema
            expect(page.locator(".opblock-post.is-open .opblock-body")).to_be_visible()

            page.goto(api.base_url + "/redoc")
            # ReDoc gives each operation a section, with its method and path.
            section = page.locator('[data-section-id="operation/generate_generate_post"]')
            expect(section).to_be_visible(timeout=15_000)
            expect(section.locator(".http-verb.post").first).to_be_visible()
            expect(section).to_contain_text("/generate")
        finally:
            browser.close()
    # Nothing the pages need came from elsewhere; ReDoc's "powered by" logo (an image) may.
    assert [url for kind, url in elsewhere if kind != "image"] == [], elsewhere


def test_before_any_model_the_503_points_at_the_playgrounds_train_panel(api: ApiServer) -> None:
    with api.client() as client:
        for response in (client.get("/ready"), client.post("/generate", json={"prompt": "Hi"})):
            assert response.status_code == 503
            message = response.json()["error"]["message"]
            assert "slm train" in message and "POST /train-jobs" in message
            assert "Train panel of the playground at /" in message
