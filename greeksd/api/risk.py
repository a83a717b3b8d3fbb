"""Portfolio risk over time: position-weighted Greeks per account and underlying
(definition in greeksd.store.risk and the README)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from quart import Blueprint, Response

from greeksd.api.errors import bad_request
from greeksd.api.openapi import ERROR, FILTERS, JSON_OK
from greeksd.api.output import json_response
from greeksd.api.params import Args
from greeksd.api.state import current_state
from greeksd.store.risk import Grid, risk_timeline

bp = Blueprint("risk", __name__)

BUCKETS: dict[str, int] = {"1s": 1, "1m": 60, "5m": 300, "1h": 3600}
MAX_BUCKETS = 10_000
DEFAULT_SPAN = timedelta(hours=1)


@bp.get("/v1/risk/timeline")
async def timeline() -> Response:
    args = Args("broker", "account", "underlying", "start", "end", "bucket")
    f = args.filter()
    bucket = args.choice("bucket", tuple(BUCKETS), "1m")
    end = f.end or datetime.now(UTC)
    try:
        start = f.start or end - DEFAULT_SPAN
    except OverflowError:
        raise bad_request("bad_time_range", "start (end - 1 h) would fall before year 1") from None
    if start >= end:
        raise bad_request("bad_time_range", "start must be before end")
    grid = Grid.covering(start, end, BUCKETS[bucket])
    if grid.count > MAX_BUCKETS:
        raise bad_request(
            "too_many_buckets",
            f"{grid.count} buckets of {bucket} between start and end; the most is "
            f"{MAX_BUCKETS}: narrow the range or use a wider bucket",
        )
    window = replace(f, start=start, end=end)
    state = current_state()
    stale_s = state.settings.stale_s
    async with state.reads.connection() as conn:
        series = await state.reads.run(risk_timeline, conn, window, BUCKETS[bucket], stale_s)
    return json_response(
        {"bucket": bucket, "start": start, "end": end, "stale_s": stale_s, "series": series}
    )


PATHS: dict[str, Any] = {
    "/v1/risk/timeline": {
        "get": {
            "summary": "Position-weighted delta/gamma/theta/vega per (broker, account, "
            "underlying), last value per contract carried forward, one point per bucket.",
            "description": "Each point: t (bucket start), delta, gamma, theta, vega (null "
            "when no contract has the value), contracts (carried in the bucket) and missing "
            "(how many of them had no fresh Greeks at the bucket's end, or the range's end "
            "if sooner: no delta in their carried snapshot, or Greeks older than stale_s, "
            "GREEKSD_STALE_S, given in the response; 0 disables staleness).",
            "parameters": [
                *[p for p in FILTERS if p["name"] != "contract_key"],
                {
                    "name": "bucket",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": list(BUCKETS)},
                },
            ],
            "responses": {**JSON_OK, "400": ERROR, "503": ERROR},
        }
    }
}
