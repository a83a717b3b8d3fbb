"""The live page at `/`: plain HTML + one script polling the JSON API, no build step.

It only reads what any client can (`/v1/streaming/status`, `/v1/risk/timeline`), so the
page can never show something the API does not. Charts are uPlot (vendored from the npm
package `uplot`, MIT, ~50 KB): fast on thousands of points and needs nothing else.
Assets are read from the package once and served with their type; unknown names 404.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from quart import Blueprint, Response

bp = Blueprint("dashboard", __name__)

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}


@cache
def _asset(name: str) -> bytes:
    return (files("greeksd.api") / "static" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(
        _asset(name),
        content_type=ASSETS[name],
        headers={"Cache-Control": "no-cache"},
    )


@bp.get("/")
async def index() -> Response:
    return _serve("index.html")


@bp.get("/dashboard/app.js")
async def app_js() -> Response:
    return _serve("app.js")


@bp.get("/dashboard/uPlot.iife.min.js")
async def uplot_js() -> Response:
    return _serve("uPlot.iife.min.js")


@bp.get("/dashboard/uPlot.min.css")
async def uplot_css() -> Response:
    return _serve("uPlot.min.css")


def _page(summary: str, content_type: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": {content_type: {}}}},
        }
    }


PATHS: dict[str, Any] = {
    "/": _page("The live dashboard: stream status, rows/s, latency, risk charts.", "text/html"),
    "/dashboard/app.js": _page("The dashboard's script.", "text/javascript"),
    "/dashboard/uPlot.iife.min.js": _page("uPlot, the charting library.", "text/javascript"),
    "/dashboard/uPlot.min.css": _page("uPlot's stylesheet.", "text/css"),
}
