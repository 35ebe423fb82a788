"""End to end in a real browser: Playwright drives Debian's headless chromium against the app
served by uvicorn; the page's top result must be the Searcher's top result, and clicking it must
load the video at the matched window."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from test_search import QUERY, tiny_index

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason="/usr/bin/chromium is not installed; run `make browser-deps` (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from vidseek.search.searcher import Searcher
    from vidseek.serve.app import create_app

    index, _ = tiny_index(tmp_path_factory.mktemp("browser"), num_clips=6)
    searcher = Searcher(index)
    port = free_port()
    config = uvicorn.Config(create_app(index, searcher=searcher), host="127.0.0.1", port=port, log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}/", "searcher": searcher}
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    searcher.close()


def test_top_result_in_the_page_is_the_searchers_and_plays_from_its_window(server, tmp_path):
    from playwright.sync_api import sync_playwright

    expected = server["searcher"].search(QUERY, k=24)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(server["url"])
            page.fill("#q", QUERY)
            page.press("#q", "Enter")
            page.wait_for_selector(".hit", timeout=30_000)
            cards = page.locator(".hit")
            assert cards.count() == len(expected)
            assert cards.first.get_attribute("data-video-id") == expected[0].video_id
            assert [cards.nth(i).get_attribute("data-video-id") for i in range(cards.count())] == \
                [h.video_id for h in expected]
            page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=30_000)
            cards.first.click()
            page.wait_for_function("document.getElementById('video').readyState >= 1", timeout=30_000)
            src = page.get_attribute("#video", "src")
            assert src.endswith(f"/videos/{expected[0].video_id}#t={expected[0].start:g},{expected[0].end:g}")
            current = page.evaluate("document.getElementById('video').currentTime")
            assert current == pytest.approx(expected[0].start, abs=0.1)
            shot = tmp_path / "results.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 0
            # A blank query is refused in the page without a request.
            page.fill("#q", "   ")
            page.press("#q", "Enter")
            assert "type some words" in page.inner_text("#status")
        finally:
            browser.close()
