"""Read queries for the API: filters, keyset pages with opaque cursors, newest-per-contract.

Every value a client sends travels as a bound parameter; identifiers come from the
constants here through `psycopg.sql`. Pages are ordered by a key that is total (rows may
share event_time, so the key runs on to broker, account, contract and the values'
fingerprint, which the unique index makes distinct), so a walk by cursor never repeats
or skips a row that existed when the walk started.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg import sql

from greeksd.store.columns import SNAPSHOT_COLUMNS
from greeksd.store.trades import RETURNED_COLUMNS as TRADE_COLUMNS

Query = tuple[sql.Composed, list[Any]]


class BadCursor(ValueError):
    """The client's cursor was not made by this server for this route."""


@dataclass(frozen=True)
class Table:
    """A pageable table: the columns returned and the total order pages follow.

    `key[0]` is the time column (it also drives partition pruning); `key_types` are the
    types of the remaining key columns, checked when a cursor is decoded."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    key_types: tuple[type, ...]
    cursor_kind: str


SNAPSHOTS = Table(
    "greek_snapshots",
    SNAPSHOT_COLUMNS,
    ("event_time", "broker", "account_id", "contract_key", "fingerprint"),
    (str, str, str, int),
    "s1",
)
TRADES = Table("trades", TRADE_COLUMNS, ("executed_at", "id"), (int,), "t1")


@dataclass(frozen=True)
class Filter:
    """Equality filters (None = any) and a half-open time range [start, end)."""

    broker: str | None = None
    account_id: str | None = None
    contract_key: str | None = None
    underlying: str | None = None
    source: str | None = None
    instance: str | None = None
    start: datetime | None = None
    end: datetime | None = None


# A stored time Python cannot hold reaches us as PostgreSQL's text in UTC (see
# greeksd.store.reads), e.g. '10000-01-01 00:00:00+00' or '0001-12-31 10:00:00+00 BC'; a
# cursor may carry it, and the server compares it as a timestamptz.
_PG_TIME_TEXT = re.compile(r"-?infinity|\d{4,}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?\+00( BC)?")


def encode_cursor(table: Table, key: Sequence[Any]) -> str:
    time_value, *rest = key
    time_text = time_value if isinstance(time_value, str) else time_value.isoformat()
    raw = orjson.dumps([table.cursor_kind, time_text, *rest])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _cursor_time(text: str) -> datetime | str:
    if _PG_TIME_TEXT.fullmatch(text):
        return text
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("naive time")
    return moment


def decode_cursor(table: Table, token: str) -> tuple[Any, ...]:
    """Inverse of `encode_cursor`; BadCursor on anything else (including a cursor from
    another route)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        kind, time_text, *rest = orjson.loads(raw)
        moment = _cursor_time(time_text)
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise BadCursor("cursor is not one this server issued") from exc
    if kind != table.cursor_kind:
        raise BadCursor("cursor belongs to another route")
    if len(rest) != len(table.key_types):
        raise BadCursor("cursor is not one this server issued")
    for value, wanted in zip(rest, table.key_types, strict=True):
        if type(value) is not wanted or (isinstance(value, str) and "\x00" in value):
            raise BadCursor("cursor is not one this server issued")
    return (moment, *rest)


def _columns(names: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def _where(f: Filter, time_column: str) -> tuple[list[sql.Composable], list[Any]]:
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    equal = (
        ("broker", f.broker),
        ("account_id", f.account_id),
        ("contract_key", f.contract_key),
        ("underlying", f.underlying),
        ("source", f.source),
        ("instance", f.instance),
    )
    for column, value in equal:
        if value is not None:
            conditions.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if f.start is not None:
        conditions.append(sql.SQL("{} >= %s").format(sql.Identifier(time_column)))
        params.append(f.start)
    if f.end is not None:
        conditions.append(sql.SQL("{} < %s").format(sql.Identifier(time_column)))
        params.append(f.end)
    return conditions, params


def _and(conditions: list[sql.Composable]) -> sql.Composable:
    if not conditions:
        return sql.SQL("TRUE")
    return sql.SQL(" AND ").join(conditions)


def page_queries(
    table: Table, f: Filter, after: Sequence[Any] | None, limit: int
) -> tuple[Query, Query]:
    """The page after `after` (None: the first), and a boundary query that returns the
    page's last key plus one more row when a further page exists."""
    conditions, params = _where(f, table.key[0])
    if after is not None:
        # The explicit time bound lets the planner prune partitions and use the time
        # index; the row comparison makes the order total.
        conditions.append(sql.SQL("{} >= %s").format(sql.Identifier(table.key[0])))
        params.append(after[0])
        placeholders = sql.SQL(", ").join(sql.Placeholder() * len(table.key))
        conditions.append(sql.SQL("({}) > ({})").format(_columns(table.key), placeholders))
        params.extend(after)
    order = sql.SQL(", ").join(sql.Identifier(c) for c in table.key)
    base = sql.SQL("FROM {} WHERE {} ORDER BY {}").format(
        sql.Identifier(table.name), _and(conditions), order
    )
    rows = sql.SQL("SELECT {} {} LIMIT %s").format(_columns(table.columns), base)
    boundary = sql.SQL("SELECT {} {} OFFSET %s LIMIT 2").format(_columns(table.key), base)
    return (rows, [*params, limit]), (boundary, [*params, limit - 1])


def latest_query(f: Filter) -> Query:
    """Newest snapshot per (broker, account, contract) within the filter; the ORDER BY
    follows the unique contract index so the planner can read it in order."""
    conditions, params = _where(f, "event_time")
    query = sql.SQL(
        "SELECT DISTINCT ON (broker, account_id, contract_key) {} FROM greek_snapshots"
        " WHERE {} ORDER BY broker, account_id, contract_key, event_time DESC, fingerprint"
    ).format(_columns(SNAPSHOT_COLUMNS), _and(conditions))
    return query, params


def risk_rows_query(f: Filter, bucket_seconds: int) -> Query:
    """Each contract's last snapshot in each bucket (buckets aligned to the Unix epoch),
    with position-weighted Greeks and `greeks_at`, ordered by bucket for a
    carry-forward sweep.

    `greeks_at` is when the row's Greeks last arrived: rows are merged (an IBKR price
    tick repeats the last delta), so a row brings Greeks only when its delta is known and
    its Greeks differ from the contract's previous row in the range (the first row with
    a delta brings them too). It is the newest such row's event_time up to this row, and
    NULL when this row has no delta. Both windows share one order, the contract index's
    read backwards."""
    conditions, params = _where(f, "event_time")
    query = sql.SQL(
        "SELECT bucket, broker, account_id, underlying, contract_key, w_delta, w_gamma,"
        " w_theta, w_vega, greeks_at FROM ("
        " SELECT DISTINCT ON (broker, account_id, contract_key, bucket)"
        " bucket, broker, account_id, underlying, contract_key,"
        " w_delta, w_gamma, w_theta, w_vega,"
        " CASE WHEN delta IS NOT NULL THEN max(brought_greeks) OVER contract END AS greeks_at"
        " FROM ("
        " SELECT"
        " date_bin(make_interval(secs => %s), event_time, 'epoch'::timestamptz) AS bucket,"
        " broker, account_id, underlying, contract_key, event_time, fingerprint, delta,"
        " (quantity * multiplier)::float8 * delta AS w_delta,"
        " (quantity * multiplier)::float8 * gamma AS w_gamma,"
        " (quantity * multiplier)::float8 * theta AS w_theta,"
        " (quantity * multiplier)::float8 * vega AS w_vega,"
        " CASE WHEN delta IS NOT NULL AND ROW(delta, gamma, theta, vega)"
        " IS DISTINCT FROM lag(ROW(delta, gamma, theta, vega)) OVER contract"
        " THEN event_time END AS brought_greeks"
        " FROM greek_snapshots WHERE {}"
        " WINDOW contract AS (PARTITION BY broker, account_id, contract_key"
        " ORDER BY event_time, fingerprint DESC)"
        " ) per_row"
        " WINDOW contract AS (PARTITION BY broker, account_id, contract_key"
        " ORDER BY event_time, fingerprint DESC ROWS UNBOUNDED PRECEDING)"
        " ORDER BY broker, account_id, contract_key, bucket, event_time DESC, fingerprint"
        ") last_per_bucket ORDER BY bucket"
    ).format(_and(conditions))
    return query, [bucket_seconds, *params]
