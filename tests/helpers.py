"""Test helpers: waiting on conditions (never bare sleeps) and reading rows back."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
import trio

from greeksd.model import Snapshot, Trade


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,  # noqa: ASYNC109 - wall clock on purpose, see docstring
    what: str = "condition",
    poll: float = 0.02,
) -> None:
    """Poll `predicate` until it is true; fail with `what` after `timeout` wall-clock
    seconds (wall clock, so a MockClock's jumps cannot end the wait early)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await trio.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ListSink:
    """A `SnapshotSink` that keeps everything, for tests of a stream without a pipeline."""

    def __init__(self) -> None:
        self.rows: list[Snapshot] = []
        self.trades: list[Trade] = []

    def put(self, snapshot: Snapshot) -> None:
        self.rows.append(snapshot)

    def put_trade(self, trade: Trade) -> None:
        self.trades.append(trade)

    def latest(self, key: str) -> Snapshot | None:
        """The last row of contract `key`, if any."""
        return next((s for s in reversed(self.rows) if s.contract_key == key), None)


def fetch_rows(db_url: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def count_rows(db_url: str, table: str = "greek_snapshots") -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0


def assert_reconnected_promptly(took: float, probes: int, reconnects: int, outage_s: float) -> None:
    """After an outage of `outage_s`: back within 5 s of the server's return, one cheap
    TCP probe per 1.5-2 s while it was down, and no full connection attempts."""
    assert took <= 5.0, f"reconnected {took:.1f}s after the server came back"
    assert outage_s / 2.0 - 1 <= probes <= outage_s / 1.5 + 1, probes
    assert reconnects <= 1, reconnects
