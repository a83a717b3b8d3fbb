"""Snapshot queries: keyset-paged history and the newest snapshot per contract."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from greeksd.api.errors import bad_request
from greeksd.api.openapi import FORMAT, LIMIT_AND_CURSOR, ROWS_RESPONSES, SNAPSHOT_FILTERS
from greeksd.api.output import stream_response
from greeksd.api.params import FORMATS, SNAPSHOT_FILTER_PARAMS, Args
from greeksd.api.state import current_state
from greeksd.store.queries import (
    SNAPSHOTS,
    BadCursor,
    Table,
    decode_cursor,
    encode_cursor,
    latest_query,
    page_queries,
)
from greeksd.store.reads import open_rows

bp = Blueprint("greeks", __name__)


async def paged(table: Table, args: Args) -> Response:
    """One page of `table` as the client asked: filter, limit, cursor, format."""
    f = args.filter()
    limit = args.limit()
    fmt = args.choice("format", FORMATS, "json")
    token = args.text("cursor")
    try:
        after = None if token is None else decode_cursor(table, token)
    except BadCursor as exc:
        raise bad_request("bad_cursor", str(exc)) from None
    rows, boundary = page_queries(table, f, after, limit)
    stream = await open_rows(current_state().reads, rows, boundary)
    more = len(stream.boundary_rows) == 2
    next_cursor = encode_cursor(table, stream.boundary_rows[0]) if more else None
    headers = {"X-Next-Cursor": next_cursor} if next_cursor else {}
    return stream_response(
        stream, table.columns, fmt, envelope={"next": next_cursor}, headers=headers
    )


@bp.get("/v1/greeks/snapshots")
async def snapshots() -> Response:
    return await paged(SNAPSHOTS, Args(*SNAPSHOT_FILTER_PARAMS, "limit", "cursor", "format"))


@bp.get("/v1/greeks/latest")
async def latest() -> Response:
    args = Args(*SNAPSHOT_FILTER_PARAMS, "format")
    f = args.filter()
    fmt = args.choice("format", FORMATS, "json")
    stream = await open_rows(current_state().reads, latest_query(f))
    return stream_response(stream, SNAPSHOTS.columns, fmt)


PATHS: dict[str, Any] = {
    "/v1/greeks/snapshots": {
        "get": {
            "summary": "Snapshots in (event_time, broker, account_id, contract_key, "
            "fingerprint) order, one page at a time; follow `next` / X-Next-Cursor.",
            "parameters": [*SNAPSHOT_FILTERS, *LIMIT_AND_CURSOR, FORMAT],
            "responses": ROWS_RESPONSES,
        }
    },
    "/v1/greeks/latest": {
        "get": {
            "summary": "The newest snapshot per (broker, account, contract) within the filters.",
            "parameters": [*SNAPSHOT_FILTERS, FORMAT],
            "responses": ROWS_RESPONSES,
        }
    },
}
