"""The dashboard in a real browser (Playwright driving Chromium): a BS with two devices on the tiny
model, one of them too slow for its deadline; the page shows the streamed text, a device's band
share and the dropped experts, takes the token for its controls, and holds its memory while a
cell at time scale 0.01 keeps it busy. Screenshots go to tests/artifacts/ (git-ignored)."""

import re
import threading
import time
from pathlib import Path

import pytest

from browser import chromium_or_skip, js_heap_bytes, launch
from lab import TOKEN
from wdmoe.dashboard.hub import HISTORY
from wdmoe.runtime import api
from wdmoe.runtime.bs import RuntimeSettings
from wdmoe.runtime.pulse import attach_dashboard

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def browser():
    path = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p, path)
        yield b
        b.close()


def test_the_page_shows_text_band_share_and_a_dropped_expert(browser, lab_factory):
    lab = lab_factory(devices=2, settings=RuntimeSettings(grace_s=0.3, slack=2.0), delays={1: 3.0})
    dash = attach_dashboard(lab.bs, "127.0.0.1", 0, TOKEN)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(dash.url)
        page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=10_000)
        m = lab.client.generate(api.GenerateRequest("what is the router", max_new_tokens=6))
        card = page.locator('#requests .request[data-id="1"]')
        card.locator(".meta").filter(has_text="TTFT").wait_for(timeout=10_000)
        assert card.locator(".text").inner_text().strip() == m["text"].strip() != ""
        share = page.locator('#devices tr[data-slot="0"] td.share').inner_text()
        assert re.fullmatch(r"\d+\.\d%", share) and float(share[:-1]) > 0, share
        page.wait_for_function(
            "Number(document.querySelector('#devices tr[data-slot=\"1\"] td.drops').textContent) > 0",
            timeout=10_000,
        )
        assert int(page.locator("#dropped-total").inner_text()) > 0 and m["dropped"] > 0
        assert page.locator("#layers tbody tr").count() == len(lab.wm.blocks)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        # the controls: refused without the token, applied with it
        page.select_option("#policy", "wdmoe")
        page.click("#controls button")
        page.locator("#control-status").filter(has_text="refused (401)").wait_for(timeout=5_000)
        page.fill("#token", TOKEN)
        page.click("#controls button")
        page.locator("#control-status").filter(has_text="applied").wait_for(timeout=5_000)
        assert lab.bs.settings.policy == "wdmoe"
    finally:
        dash.close()


def test_page_and_bs_hold_their_memory_on_a_fast_cell(browser, lab_factory):
    """A short version of benchmarks/dashboard_soak.py: a cell at time scale 0.01 with emulated
    links, users back to back for ~20 s; the page's JS heap after GC and the hub stay bounded."""
    settings = RuntimeSettings(emulate_links=True, time_scale=0.01, grace_s=0.3)
    lab = lab_factory(devices=2, settings=settings, overrides=["cell.bandwidth_hz=2e5"])
    dash = attach_dashboard(lab.bs, "127.0.0.1", 0, TOKEN)
    stop = threading.Event()

    def users() -> None:
        while not stop.is_set():
            lab.client.generate(api.GenerateRequest("what is the router", max_new_tokens=12))

    worker = threading.Thread(target=users, daemon=True)
    try:
        page = browser.new_page()
        page.goto(dash.url)
        worker.start()
        time.sleep(6)  # warm-up: every table row and card slot exists
        start = js_heap_bytes(page)
        time.sleep(14)
        end = js_heap_bytes(page)
    finally:
        stop.set()
        worker.join(60)
        dash.close()
    steps = lab.bs.books.pulse.steps
    assert steps > 100, steps
    assert page.locator("#requests .request").count() <= 12
    assert len(dash.hub.history) <= HISTORY and not lab.bs.books.pulse.failed
    assert end - start < 2_000_000, (start, end)  # bytes of JS heap after GC
