"""GET /v1/coverage: per subscribed contract, whether its Greeks arrive (greeksd.coverage).

Read from the streams' trackers on the service's loop, so the counts and the rows are
one consistent snapshot; no database involved (coverage is about the live links)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from quart import Blueprint

from greeksd.api.openapi import ERROR, JSON_OK, query_param
from greeksd.api.params import Args, parse_broker
from greeksd.api.state import ServiceState, current_state
from greeksd.brokers import registry
from greeksd.coverage import STATES

bp = Blueprint("coverage", __name__)


def coverage_json(state: ServiceState, broker: str | None, wanted: str | None) -> dict[str, Any]:
    """Every stream's summary, and its contracts (only `broker`'s, only in `wanted`)."""
    now = datetime.now(UTC)
    stale_s = state.settings.stale_s
    sources: dict[str, Any] = {}
    contracts: list[dict[str, Any]] = []
    for name, status in sorted(state.supervisor.registry.items()):
        coverage = status.coverage
        if coverage is None or (broker is not None and name != broker):
            continue
        sources[name] = coverage.summary(now)
        for entry in coverage.entries():
            row = entry.as_json(now, coverage.stale_s)
            if wanted is None or row["state"] == wanted:
                contracts.append(row)
    return {
        "stale_s": stale_s,
        "as_of": now.isoformat(),
        "sources": sources,
        "contracts": contracts,
    }


@bp.get("/v1/coverage")
async def coverage() -> dict[str, Any]:
    args = Args("broker", "state")
    broker = args.text("broker")
    if broker is not None:
        parse_broker(broker)
    wanted = args.text("state")
    if wanted is not None:
        wanted = args.choice("state", STATES, wanted)
    state = current_state()
    return await state.on_service_loop(coverage_json, state, broker, wanted)


PATHS: dict[str, Any] = {
    "/v1/coverage": {
        "get": {
            "summary": "Per contract: last Greeks and price times, data quality, and its "
            "state (fresh, stale, never, delayed); per source: the counts.",
            "parameters": [
                query_param(
                    "broker",
                    "Only this broker.",
                    {"type": "string", "enum": list(registry.names())},
                ),
                query_param(
                    "state",
                    "Only contracts in this state.",
                    {"type": "string", "enum": list(STATES)},
                ),
            ],
            "responses": {**JSON_OK, "400": ERROR},
        }
    }
}
