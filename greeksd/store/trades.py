"""The trades log: broker executions and strategy-log entries, idempotent on
(broker, broker_trade_id) so a re-polled execution list or a retried POST stores
nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from greeksd.model import Trade

TRADE_COLUMNS: tuple[str, ...] = (
    "broker",
    "broker_trade_id",
    "account_id",
    "contract_key",
    "symbol",
    "side",
    "quantity",
    "price",
    "executed_at",
    "source",
    "note",
    "source_payload",
)
# What a client sees of a stored trade (everything but the payload, plus the row's id).
RETURNED_COLUMNS: tuple[str, ...] = ("id", *TRADE_COLUMNS[:-1], "recorded_at")

_INSERT = (
    f"INSERT INTO trades ({', '.join(TRADE_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(TRADE_COLUMNS))}) "
    "ON CONFLICT (broker, broker_trade_id) DO NOTHING"
)
_RETURNING = f" RETURNING {', '.join(RETURNED_COLUMNS)}"
_SELECT_ONE = (
    f"SELECT {', '.join(RETURNED_COLUMNS)} FROM trades WHERE broker = %s AND broker_trade_id = %s"
)


def _payload(payload: dict[str, Any] | None) -> Jsonb | None:
    if payload is None:
        return None
    return Jsonb(payload, dumps=lambda obj: orjson.dumps(obj).decode())


def trade_params(t: Trade) -> tuple[Any, ...]:
    return (
        t.broker,
        t.broker_trade_id,
        t.account_id,
        t.contract_key,
        t.symbol,
        t.side,
        t.quantity,
        t.price,
        t.executed_at,
        t.source,
        t.note,
        _payload(t.source_payload),
    )


def insert_trades(conn: psycopg.Connection, trades: Sequence[Trade]) -> int:
    """Store `trades` in one transaction; return how many were new (the rest were
    already there under the same (broker, broker_trade_id))."""
    if not trades:
        return 0
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(_INSERT, [trade_params(t) for t in trades])
        return max(cur.rowcount, 0)


def record_trade(conn: psycopg.Connection, trade: Trade) -> tuple[dict[str, Any], bool]:
    """Store one trade; return the stored row and whether it is new. An existing row is
    returned as stored, so the caller can tell a true retry from a conflicting reuse of
    the same broker_trade_id."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_INSERT + _RETURNING, trade_params(trade))
        row = cur.fetchone()
        if row is not None:
            return row, True
        cur.execute(_SELECT_ONE, (trade.broker, trade.broker_trade_id))
        existing = cur.fetchone()
        assert existing is not None, "conflict without a row: the unique key changed?"
        return existing, False
