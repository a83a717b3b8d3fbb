"""Rows out as JSON, NDJSON or CSV, streamed chunk by chunk from a `RowStream`.

Nothing builds the whole result in memory: each chunk of rows fetched from the
server-side cursor is encoded and sent before the next one is fetched. The `next`
cursor is known before the first byte (see greeksd.store.reads), so it travels in the
`X-Next-Cursor` header for every format and also in the JSON envelope.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from quart import Response

from greeksd.store.reads import RowStream

CONTENT_TYPES = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
}


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


async def _encode(
    stream: RowStream, columns: Sequence[str], fmt: str, envelope: dict[str, Any]
) -> AsyncIterator[bytes]:
    try:
        if fmt == "json":
            yield dumps(envelope)[:-1] + b',"rows":[' if envelope else b'{"rows":['
        elif fmt == "csv":
            yield _csv_lines([columns])
        first = True
        async for rows in stream:
            if fmt == "csv":
                yield _csv_lines([[_csv_cell(v) for v in row] for row in rows])
                continue
            encoded = [dumps(dict(zip(columns, row, strict=True))) for row in rows]
            if fmt == "ndjson":
                yield b"\n".join(encoded) + b"\n"
            else:
                yield (b"" if first else b",") + b",".join(encoded)
            first = False
        if fmt == "json":
            yield b"]}"
    finally:
        await stream.aclose()


def _csv_lines(rows: Sequence[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


def stream_response(
    stream: RowStream,
    columns: Sequence[str],
    fmt: str,
    *,
    envelope: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = Response(
        _encode(stream, columns, fmt, envelope or {}),
        content_type=CONTENT_TYPES[fmt],
        headers=headers or {},
    )
    # A large page must not be cut off by Quart's default 60 s response timeout.
    response.timeout = None
    return response


def json_response(value: Any, status: int = 200) -> Response:
    """A small JSON answer encoded like the streamed rows (Decimal as a number)."""
    return Response(dumps(value), status=status, content_type=CONTENT_TYPES["json"])
