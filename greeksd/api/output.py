"""Rows out as JSON, NDJSON or CSV, streamed chunk by chunk from a `RowStream`.

Nothing builds the whole result in memory: each chunk of rows fetched from the
server-side cursor is encoded and sent before the next one is fetched. The `next`
cursor is known before the first byte (see greeksd.store.reads), so it travels in the
`X-Next-Cursor` header for every format and also in the JSON envelope.

Rendering never fails on a stored value: a numeric too large for a JSON integer becomes a
float, one a float cannot hold (or NaN/Infinity) its text, any other unknown type its
text; times Python cannot hold already arrive as text (greeksd.store.reads). If a
response still fails after its headers are out (the database goes away mid-page), the
error is logged and re-raised: Hypercorn then closes the connection without the chunked
terminator, so the client sees a broken response, never a clean-looking short 200.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from quart import Response, request

from greeksd.logs import get_logger
from greeksd.store.reads import RowStream

log = get_logger("greeksd.api")

CONTENT_TYPES = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
}


# What orjson encodes as an integer.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _decimal(value: Decimal) -> int | float | str:
    if not value.is_finite():
        return str(value)  # 'NaN', 'Infinity', '-Infinity': JSON has no such numbers
    if value == value.to_integral_value() and _INT_MIN <= value <= _INT_MAX:
        return int(value)
    number = float(value)
    if math.isinf(number) or (number == 0 and value != 0):
        return str(value)
    return number


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _decimal(value)
    return str(value)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


async def _encode(
    stream: RowStream, columns: Sequence[str], fmt: str, envelope: dict[str, Any], path: str
) -> AsyncIterator[bytes]:
    sent = 0
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
            sent += len(rows)
        if fmt == "json":
            yield b"]}"
    except Exception as exc:
        log.error(
            "api_response_aborted",
            path=path,
            rows_sent=sent,
            error=f"{type(exc).__name__}: {str(exc).strip()}",
        )
        raise
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
        # The body is sent after the request context is gone: take the path now.
        _encode(stream, columns, fmt, envelope or {}, request.path),
        content_type=CONTENT_TYPES[fmt],
        headers=headers or {},
    )
    # A large page must not be cut off by Quart's default 60 s response timeout.
    response.timeout = None
    return response


def json_response(value: Any, status: int = 200) -> Response:
    """A small JSON answer encoded like the streamed rows (Decimal as a number)."""
    return Response(dumps(value), status=status, content_type=CONTENT_TYPES["json"])
