"""The live page in a real headless Chromium, against `greeksd demo`: it loads, shows both
brokers connected, and its risk charts fill with points, with a tooltip that says how
many contracts each value sums and how many lack fresh Greeks. Saves
artifacts/dashboard.png.

The coverage panel reads `GET /v1/coverage`: against a small real HTTP server run by the
test (the page's own assets plus fixed JSON in the API's shapes), the bars and the stale
table show exactly the numbers served, and a server answering 404 there gets "coverage
unavailable" while the rest of the page works. Against the demo the panel is checked
in whichever form the service offers (bars per broker when it serves /v1/coverage).

Playwright drives the system Chromium (Debian's `chromium`; `.ci/run` installs it);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from greeksd.api.dashboard import ASSETS

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

            tip = _hover_last_point(page)
            assert " contracts · " in tip and " missing Greeks" in tip, tip
            _check_demo_coverage(page, demo_url)
            assert errors == []
        finally:
            browser.close()


def _hover_last_point(page: Any) -> str:
    """Move the mouse to the delta chart's newest bucket; returns the tooltip's text."""
    over = page.locator(".chart[data-greek=delta] .u-over")
    box = over.bounding_box()
    assert box is not None
    over.hover(position={"x": box["width"] - 1, "y": box["height"] / 2})
    tip = page.locator(".chart[data-greek=delta] .tooltip")
    tip.wait_for(state="visible", timeout=5_000)
    text: str = tip.inner_text()
    return text


def _check_demo_coverage(page: Any, demo_url: str) -> None:
    try:
        with urllib.request.urlopen(urljoin(demo_url, "/v1/coverage"), timeout=10) as response:
            served = json.load(response)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404, exc
        page.wait_for_selector("#coverage[data-state=unavailable]", timeout=10_000)
        assert "coverage unavailable" in page.locator("#coverage").inner_text()
        return
    assert set(served["sources"]) == {"ibkr", "tastytrade"}
    page.wait_for_selector("#coverage[data-state=ok]", timeout=10_000)
    for broker in ("ibkr", "tastytrade"):
        bar = page.locator(f".coverage[data-broker={broker}]")
        assert int(bar.get_attribute("data-subscribed") or 0) > 0


# ---- the coverage panel against a small real HTTP server ---------------------------------
STALE_S = 120.0
SUMMARIES = {
    "ibkr": {"subscribed": 40, "fresh": 30, "stale": 6, "never": 3, "delayed": 1},
    "tastytrade": {"subscribed": 10, "fresh": 10, "stale": 0, "never": 0, "delayed": 0},
}


def _coverage() -> dict[str, Any]:
    """A /v1/coverage body as the coverage contract shapes it, consistent with SUMMARIES."""
    contracts = []
    for broker, summary in SUMMARIES.items():
        n = 0
        for state in ("fresh", "stale", "never", "delayed"):
            for _ in range(summary[state]):
                n += 1
                contracts.append(
                    {
                        "broker": broker,
                        "account_id": "U1",
                        "contract_key": f"SPY 2026-12-18 C {500 + n}",
                        "state": state,
                        "last_greeks_at": None if state == "never" else "2026-11-25T15:00:00Z",
                        "last_price_at": "2026-11-25T15:30:00Z",
                        "market_data": "delayed" if state == "delayed" else "live",
                    }
                )
    return {
        "stale_s": STALE_S,
        "as_of": "2026-11-25T15:30:01Z",
        "sources": {b: {**s, "stale_s": STALE_S} for b, s in SUMMARIES.items()},
        "contracts": contracts,
    }


STREAM = {
    "state": "connected",
    "reason": None,
    "ticks": 100,
    "subscriptions": 40,
    "rejected_frames": 0,
    "reconnects": 0,
    "last_message_at": None,
}
STATUS = {
    "streams": {"ibkr": STREAM, "tastytrade": STREAM},
    "writer": {
        "state": "connected",
        "rows_written": 1000,
        "queue_depth": 0,
        "duplicates": 0,
        "late": 0,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
    },
}
TIMELINE = {
    "bucket": "1s",
    "stale_s": STALE_S,
    "series": [
        {
            "broker": "ibkr",
            "account_id": "U1",
            "underlying": "SPY",
            "points": [
                {
                    "t": f"2026-11-25T15:30:0{i}Z",
                    "delta": 10.0 + i,
                    "gamma": 1.0,
                    "theta": -1.0,
                    "vega": 2.0,
                    "contracts": 3,
                    "missing": i,
                }
                for i in range(3)
            ],
        }
    ],
}


@pytest.fixture(params=[True, False], ids=["coverage", "no-coverage"])
def stub_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, bool]]:
    """The dashboard's own assets, fixed status and timeline, and /v1/coverage (or a 404
    there, as a server without the endpoint answers)."""
    bodies: dict[str, tuple[int, str, bytes]] = {
        route: (200, a.content_type, (files("greeksd.api") / "static" / a.file).read_bytes())
        for route, a in ASSETS.items()
    }
    served = {"/v1/streaming/status": STATUS, "/v1/risk/timeline": TIMELINE}
    if request.param:
        served["/v1/coverage"] = _coverage()
    for route, body in served.items():
        bodies[route] = (200, "application/json", json.dumps(body).encode())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, kind, body = bodies.get(
                urlsplit(self.path).path, (404, "application/json", b'{"error":"not_found"}')
            )
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", request.param
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_coverage_bars_stale_table_and_tooltip_show_what_the_api_serves(
    stub_url: tuple[str, bool],
) -> None:
    from playwright.sync_api import sync_playwright

    url, with_coverage = stub_url
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_function(
                "document.querySelector('.chart[data-greek=delta]')?.dataset.points === '3'",
                timeout=10_000,
            )
            # the tooltip at the newest bucket: 3 contracts, 2 of them without fresh Greeks
            assert "SPY: 12.000 · 3 contracts · 2 missing Greeks" in _hover_last_point(page)
            if not with_coverage:
                page.wait_for_selector("#coverage[data-state=unavailable]", timeout=10_000)
                text = page.locator("#coverage").inner_text()
                assert "coverage unavailable" in text
                assert page.locator(".coverage").count() == 0
                assert errors == []
                return
            page.wait_for_selector("#coverage[data-state=ok]", timeout=10_000)
            for broker, summary in SUMMARIES.items():
                bar = page.locator(f".coverage[data-broker={broker}]")
                counts = bar.locator(".counts").inner_text().split()
                assert counts == [
                    x
                    for state in ("fresh", "stale", "never", "delayed")
                    for x in (state, str(summary[state]))
                ]
                assert f"{summary['subscribed']} subscribed" in bar.inner_text()
                widths = bar.locator(".segment").evaluate_all(
                    "s => s.map(e => [e.classList[1], e.getBoundingClientRect().width])"
                )
                total = bar.locator(".bar").bounding_box()
                assert total is not None
                shown = [
                    state for state in ("fresh", "stale", "never", "delayed") if summary[state]
                ]
                assert [w[0] for w in widths] == shown
                for state, width in widths:
                    share = summary[state] / summary["subscribed"]
                    assert width == pytest.approx(share * total["width"], abs=1.0), state
            rows = page.locator("#stale tbody tr")
            states = rows.evaluate_all("r => r.map(e => [e.dataset.broker, e.dataset.state])")
            assert states == [["ibkr", "stale"]] * 6 + [["ibkr", "never"]] * 3
            last_greeks = rows.evaluate_all("r => r.map(e => e.cells[4].textContent)")
            assert last_greeks[6:] == ["never"] * 3 and "never" not in last_greeks[:6]
            assert "stale after 120 s" in page.locator("#coverage").inner_text()
            page.screenshot(path=str(ARTIFACTS / "dashboard-coverage.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
