"""The live page at `/`: plain HTML + one script polling the JSON API, no build step.

It only reads what any client can (`/v1/streaming/status`, `/v1/coverage`,
`/v1/risk/timeline`), so the page can never show something the API does not; a server
without `/v1/coverage` gets "coverage unavailable" in that panel and the rest works.
Charts are uPlot (vendored from the npm package `uplot`, MIT, ~50 KB): fast on
thousands of points and needs nothing else.
Assets are read from the package once and served with their type; unknown names 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from quart import Blueprint, Response

bp = Blueprint("dashboard", __name__)


@dataclass(frozen=True)
class Asset:
    file: str  # in greeksd/api/static
    content_type: str
    summary: str  # for /openapi.json


# route -> asset: every route the page needs, and nothing else (anything else 404s)
ASSETS: dict[str, Asset] = {
    "/": Asset(
        "index.html",
        "text/html; charset=utf-8",
        "The live dashboard: stream status, coverage, rows/s, latency, risk charts.",
    ),
    "/dashboard/app.js": Asset(
        "app.js", "text/javascript; charset=utf-8", "The dashboard's script."
    ),
    "/dashboard/uPlot.iife.min.js": Asset(
        "uPlot.iife.min.js", "text/javascript; charset=utf-8", "uPlot, the charting library."
    ),
    "/dashboard/uPlot.min.css": Asset(
        "uPlot.min.css", "text/css; charset=utf-8", "uPlot's stylesheet."
    ),
}


@cache
def _read(file: str) -> bytes:
    return (files("greeksd.api") / "static" / file).read_bytes()


def _view(asset: Asset) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(
            _read(asset.file),
            content_type=asset.content_type,
            headers={"Cache-Control": "no-cache"},
        )

    return serve


for _route, _asset in ASSETS.items():
    bp.add_url_rule(
        _route, endpoint=_asset.file.replace(".", "_"), view_func=_view(_asset), methods=["GET"]
    )


PATHS: dict[str, Any] = {
    route: {
        "get": {
            "summary": asset.summary,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {asset.content_type.split(";")[0]: {}},
                }
            },
        }
    }
    for route, asset in ASSETS.items()
}
