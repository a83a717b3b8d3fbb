"""The live page in a real headless Chromium, against `greeksd demo`: it loads, shows both
brokers connected, and its risk charts fill with points. Saves artifacts/dashboard.png.

Playwright drives the system Chromium (Debian's `chromium`; `.ci/run` installs it);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"
)


@pytest.fixture
def demo_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A running `greeksd demo`; stopped with SIGINT, which must end it cleanly."""
    env = {
        **os.environ,
        "GREEKSD_DATABASE_URL": db_url,
        "GREEKSD_API_PORT": "0",
        "GREEKSD_DATA_DIR": str(tmp_path),
        "GREEKSD_LOG_LEVEL": "WARNING",
    }
    stderr = (tmp_path / "demo.stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "greeksd.cli", "demo", "--duration", "120", "--status-every", "30"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # the first line names the page
            if line.startswith("greeksd demo: dashboard at "):
                url = line.split(" at ", 1)[1].strip()
                break
        assert url, "the demo never printed its dashboard URL"
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        stderr.close()
    assert code == 0, (tmp_path / "demo.stderr").read_text()[-2000:]


def test_dashboard_shows_both_brokers_connected_and_charts_with_points(demo_url: str) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(demo_url)
            assert page.title() == "greeksd · live risk"
            page.wait_for_function(
                "['ibkr', 'tastytrade'].every(b => document.querySelector("
                "`.stream[data-broker=${b}][data-state=connected]`))",
                timeout=30_000,
            )
            # enough 1 s buckets (5 underlyings) that the screenshot shows lines, not dots
            page.wait_for_function(
                "(() => { const c = [...document.querySelectorAll('.chart')];"
                " return c.length === 4 && c.every(e => Number(e.dataset.points) >= 40); })()",
                timeout=30_000,
            )
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            legends = page.locator(".chart[data-greek=delta] .u-legend .u-label").all_inner_texts()
            assert {"AAPL", "SPY", "SPX", "MSFT", "QQQ"} <= set(legends)
            page.select_option("#group", "broker")
            page.wait_for_function(
                "[...document.querySelectorAll('.chart[data-greek=delta] .u-label')]"
                ".some(l => l.textContent.startsWith('tastytrade'))",
                timeout=10_000,
            )
            by_broker = page.locator(".chart[data-greek=delta] .u-legend .u-label")
            labels = by_broker.all_inner_texts()
            assert any(t.startswith("ibkr · ") for t in labels)
            assert any(t.startswith("tastytrade · ") for t in labels)
            assert page.locator("#rows").inner_text() not in ("", "–", "0")
            assert errors == []
        finally:
            browser.close()
