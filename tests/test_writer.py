"""The writer against a real PostgreSQL: flush policy, exact round trip, retries."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
import trio
import trio.testing

from greeksd.model import Broker, OptionRight
from greeksd.pipeline import open_pipeline
from greeksd.store.writer import Writer
from tests.factories import make_snapshot
from tests.helpers import count_rows, fetch_rows, wait_until


async def test_flushes_when_batch_reaches_flush_rows(
    db_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(db_url, store_payload=True, flush_rows=5, flush_ms=60_000) as pipeline:
        start = trio.current_time()
        for i in range(5):
            pipeline.sink.put(make_snapshot(i))
        await pipeline.writer.wait_settled(5)
        assert trio.current_time() - start < 60.0, "flushed by time, not by size"
        assert pipeline.writer.stats.batches == 1
        assert count_rows(db_url) == 5


async def test_flushes_partial_batch_after_flush_ms(
    db_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(
        db_url, store_payload=True, flush_rows=1000, flush_ms=2000
    ) as pipeline:
        start = trio.current_time()
        for i in range(3):
            pipeline.sink.put(make_snapshot(i))
        await trio.sleep(1.9)  # virtual time: just before the deadline
        assert count_rows(db_url) == 0
        await pipeline.writer.wait_settled(3)
        assert trio.current_time() - start >= 2.0
        assert pipeline.writer.stats.batches == 1
        assert count_rows(db_url) == 3


async def test_rows_that_came_during_a_write_wait_flush_ms_from_its_start(db_url: str) -> None:
    """A row that arrives while a batch is being written has waited since that write
    began at the latest: when the write takes longer than flush_ms (here the table is
    locked for 1.2 s), that row's batch goes out right after it, not flush_ms later."""
    blocker = psycopg.connect(db_url)
    async with open_pipeline(db_url, flush_rows=1000, flush_ms=1000) as pipeline:
        writer = pipeline.writer
        blocker.execute("LOCK TABLE greek_snapshots IN ACCESS EXCLUSIVE MODE")
        pipeline.sink.put(make_snapshot(0))
        await wait_until(lambda: bool(writer._in_flight), what="the first write to start")
        pipeline.sink.put(make_snapshot(1))  # while the first batch waits for the lock
        await trio.sleep(1.2)  # the write now takes longer than flush_ms
        blocker.rollback()
        released = trio.current_time()
        await writer.wait_settled(2)
        assert trio.current_time() - released < 0.6, "waited another flush_ms"
        assert writer.stats.batches == 2
    blocker.close()


async def test_every_column_round_trips_exactly(db_url: str) -> None:
    eastern = timezone(timedelta(hours=-5))
    event_time = datetime(2026, 11, 25, 10, 30, 0, 123000, tzinfo=eastern)
    full = make_snapshot(
        1,
        strike=Decimal("512.5"),
        event_time=event_time,
        option_type=OptionRight.PUT,
        expiration=date(2027, 1, 15),
        contract_key="SPY 2027-01-15 P 512.5",
        underlying="SPY",
    )
    sparse = make_snapshot(
        2,
        broker=Broker.IBKR,
        delta=None,
        gamma=None,
        theta=None,
        vega=None,
        rho=None,
        implied_volatility=None,
        mark=None,
        multiplier=None,
        quantity=None,
        source_payload=None,
    )
    nan = make_snapshot(3, rho=float("nan"), vega=float("inf"))
    async with open_pipeline(db_url, store_payload=True, flush_rows=3) as pipeline:
        for snapshot in (full, sparse, nan):
            pipeline.sink.put(snapshot)
    rows = fetch_rows(
        db_url,
        "SELECT broker, account_id, contract_key, underlying, expiration,"
        " strike, option_type, multiplier, quantity, delta, gamma, theta, vega, rho,"
        " implied_volatility, underlying_price, bid, ask, last, mark, event_time,"
        " received_at, source_payload, persisted_at FROM greek_snapshots"
        " ORDER BY event_time",
    )
    by_seq = {}
    for row in rows:
        by_seq[row[0], row[13] is None and row[9] is None] = row
    got_full = next(r for r in rows if r[2] == "SPY 2027-01-15 P 512.5")
    assert got_full[:23] == (
        "synthetic",
        full.account_id,
        "SPY 2027-01-15 P 512.5",
        "SPY",
        date(2027, 1, 15),
        Decimal("512.5"),
        "P",
        Decimal(100),
        Decimal(2),
        full.delta,
        0.03,
        -0.08,
        0.21,
        0.04,
        0.27,
        191.25,
        5.3,
        5.4,
        5.35,
        5.35,
        event_time,
        full.received_at,
        {"seq": 1},
    )
    assert got_full[20].utcoffset() is not None and got_full[20] == event_time
    got_sparse = next(r for r in rows if r[0] == "ibkr")
    assert got_sparse[7:10] == (None, None, None)
    assert got_sparse[10:15] == (None, None, None, None, None)
    assert got_sparse[19] is None and got_sparse[22] is None
    got_nan = next(r for r in rows if r[22] == {"seq": 3})
    assert got_nan[12] is None and got_nan[13] is None, "NaN/inf must be stored as NULL"
    for row in rows:
        assert row[23] >= row[21], "persisted_at is after received_at"


async def test_the_market_data_flag_is_stored_as_given(db_url: str) -> None:
    flags = ("live", "delayed", "frozen", None)
    writer = Writer(db_url, store_payload=True)
    await writer.write_batch([make_snapshot(i, market_data=f) for i, f in enumerate(flags)])
    rows = fetch_rows(
        db_url, "SELECT (source_payload->>'seq')::int, market_data FROM greek_snapshots"
    )
    assert sorted(rows) == list(enumerate(flags))


async def test_same_batch_twice_is_stored_once(db_url: str) -> None:
    batch = [make_snapshot(i) for i in range(10)]
    writer = Writer(db_url, store_payload=True)
    await writer.write_batch(batch)
    await writer.write_batch(batch)
    assert count_rows(db_url) == 10
    assert writer.stats.rows_written == 10 and writer.stats.duplicates == 10


async def test_same_time_different_values_are_both_kept(db_url: str) -> None:
    first = make_snapshot(0)
    second = make_snapshot(0, delta=0.61)
    writer = Writer(db_url, store_payload=True)
    await writer.write_batch([first, second])
    assert count_rows(db_url) == 2


async def test_batch_killed_mid_write_is_retried_without_loss_or_duplicates(db_url: str) -> None:
    """Hold a lock so the writer's INSERT blocks, kill its backend, release: the batch
    must be retried on a new connection and land exactly once."""
    batch = [make_snapshot(i) for i in range(50)]
    writer = Writer(db_url, store_payload=True)
    await writer.write_batch(batch[:10])  # connection up, staging table created
    blocker = psycopg.connect(db_url)
    blocker.execute("LOCK TABLE greek_snapshots IN EXCLUSIVE MODE")

    def writer_waiting_pid() -> int | None:
        row = fetch_rows(
            db_url,
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND (query LIKE 'COPY greek_snapshots%%'"
            " OR query LIKE 'INSERT INTO greek_snapshots%%')",
        )
        return row[0][0] if row else None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write_batch, batch)
        await wait_until(lambda: writer_waiting_pid() is not None, what="writer blocked")
        pid = writer_waiting_pid()
        fetch_rows(db_url, "SELECT pg_terminate_backend(%s)", (pid,))
        await wait_until(lambda: writer.stats.failed_attempts == 1, what="failed attempt")
        blocker.rollback()
        blocker.close()
    assert writer.stats.failed_attempts == 1
    rows = fetch_rows(
        db_url, "SELECT source_payload->>'seq', count(*) FROM greek_snapshots GROUP BY 1"
    )
    assert sorted(int(seq) for seq, _ in rows) == list(range(50))
    assert all(n == 1 for _, n in rows)


async def test_writer_reports_degraded_while_database_refuses(db_url: str) -> None:
    attempts = 0

    def flaky_connect(url: str) -> psycopg.Connection:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise psycopg.OperationalError("connection refused (simulated by the test)")
        return psycopg.connect(url)

    writer = Writer(db_url, store_payload=True, connect=flaky_connect)
    states = []

    async def watch() -> None:
        while True:
            states.append(writer.stats.state.value)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await writer.write_batch([make_snapshot(0)])
        nursery.cancel_scope.cancel()
    assert "degraded" in states
    assert writer.stats.state.value == "connected"
    assert writer.stats.failed_attempts == 2
    assert count_rows(db_url) == 1


@pytest.mark.parametrize("n", [0, 1])
async def test_closing_the_channel_flushes_everything(db_url: str, n: int) -> None:
    async with open_pipeline(
        db_url, store_payload=True, flush_rows=50, flush_ms=600_000
    ) as pipeline:
        for i in range(n * 7):
            pipeline.sink.put(make_snapshot(i))
    assert count_rows(db_url) == n * 7


async def test_out_of_order_events_are_stored_and_counted_late(db_url: str) -> None:
    writer = Writer(db_url, store_payload=True)
    # Same contract (i % 5 == 0), event_time = base + i ms.
    newer, older, newest = make_snapshot(10), make_snapshot(5), make_snapshot(15)
    await writer.write_batch([newer, older])
    await writer.write_batch([newest, make_snapshot(0)])
    assert writer.stats.late == 2
    assert count_rows(db_url) == 4
