"""Chromium for the dashboard's browser tests and soak: Debian's ``chromium`` driven by Playwright
(which cannot download its own browser here). ``chromium_or_skip`` says why a test cannot run."""

import os
import shutil

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WHY = "apt-get install -y chromium (make test does, where apt is at hand), or set WDMOE_CHROMIUM"


def chromium_path() -> str | None:
    """$WDMOE_CHROMIUM, else the first Chromium on PATH, else None."""
    given = os.environ.get("WDMOE_CHROMIUM")
    if given:
        return given if os.path.exists(given) else None
    return next((p for name in CANDIDATES if (p := shutil.which(name))), None)


def chromium_or_skip() -> str:
    """The Chromium binary; skips the test, saying why, when Playwright or Chromium is absent."""
    pytest.importorskip(
        "playwright.sync_api", reason="the browser tests need Playwright: pip install '.[dev]'"
    )
    path = chromium_path()
    given = os.environ.get("WDMOE_CHROMIUM")
    if path is None and given:
        pytest.skip(f"Chromium is absent: WDMOE_CHROMIUM={given} does not exist")
    if path is None:
        pytest.skip(f"Chromium is absent: {WHY}")
    return path


def launch(playwright, path: str):
    """Headless Chromium (no sandbox: CI runs as root in a container)."""
    return playwright.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])


def js_heap_bytes(page) -> int:
    """The page's used JS heap after a forced garbage collection (Chrome DevTools Protocol)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("HeapProfiler.collectGarbage")
    used = int(cdp.send("Runtime.getHeapUsage")["usedSize"])
    cdp.detach()
    return used
