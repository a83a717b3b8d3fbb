"""Storage per row on a real PostgreSQL: new partitions' packed column layout, and the
compaction of a partition's indexes once it is no longer written (the keeper's rounds,
`greeksd replay`), with writes going on meanwhile and nothing lost."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from greeksd.replay import replay_fixture
from greeksd.store.compaction import (
    CompactionStats,
    compact,
    compact_closed,
    compact_loaded,
)
from greeksd.store.ddl_lock import COMPACT_LOCK
from greeksd.store.partitions import PARENT, create_partition, ensure_partitions, partition_name
from greeksd.store.writer import Writer
from tests.api_harness import serve_api
from tests.factories import BASE_TIME, make_snapshot
from tests.helpers import fetch_rows, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "mixed-session.jsonl.gz"
DAY = BASE_TIME.date()
PARTITION = partition_name(DAY)
ROWS = 20_000


def _columns(url: str, table: str) -> list[tuple[str, str, bool, int]]:
    return fetch_rows(
        url,
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull, attlen FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    )


async def _write_interleaved(url: str, rows: int = ROWS, start: int = 0) -> None:
    """Five contracts in time order, as a live stream writes them: each insert lands
    inside the contract index, not at its right edge."""
    writer = Writer(url)
    for first in range(start, start + rows, 2000):
        await writer.write_batch([make_snapshot(i) for i in range(first, first + 2000)])


def _all_rows(url: str) -> list[tuple[object, ...]]:
    return fetch_rows(
        url,
        "SELECT broker, account_id, contract_key, event_time, fingerprint, delta, strike,"
        " quantity, persisted_at FROM greek_snapshots ORDER BY event_time, contract_key",
    )


def _index_bytes(url: str, table: str) -> int:
    return int(fetch_rows(url, "SELECT pg_indexes_size(%s::regclass)", (table,))[0][0])


def _closed_now(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(), UTC) + timedelta(hours=2)


def test_new_partition_stores_columns_packed_with_the_parents_definitions(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert create_partition(conn, date(2031, 3, 4))
    parent, packed = _columns(db_url, PARENT), _columns(db_url, partition_name(date(2031, 3, 4)))
    assert sorted(parent) == sorted(packed)
    lengths = [length for *_, length in packed]
    fixed = [length for length in lengths if length > 0]
    assert lengths == fixed + [-1] * (len(lengths) - len(fixed))  # variable-length last
    assert fixed == sorted(fixed, reverse=True)  # 8-byte columns before the date
    defaults = fetch_rows(
        db_url,
        "SELECT c.relname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d"
        " JOIN pg_class c ON c.oid = d.adrelid JOIN pg_attribute a"
        " ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE a.attname = 'persisted_at'"
        " AND c.relname IN (%s, %s) ORDER BY 1",
        (PARENT, partition_name(date(2031, 3, 4))),
    )
    assert [d for _, d in defaults] == ["clock_timestamp()", "clock_timestamp()"]
    with (
        psycopg.connect(db_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute(
            "INSERT INTO greek_snapshots (broker, account_id, contract_key, underlying,"
            " expiration, strike, option_type, event_time, received_at, fingerprint)"
            " VALUES ('ibkr', 'U1', 'k', 'AAPL', '2031-03-20', 1, 'X', '2031-03-04 12:00Z',"
            " now(), 1)"
        )


async def test_rows_moved_from_the_default_partition_keep_every_value(db_url: str) -> None:
    """The new partition's columns are in another order than the default's: the rows
    it takes over are moved by column name."""
    await Writer(db_url).write_batch([make_snapshot(i, market_data="delayed") for i in range(10)])
    before = _all_rows(db_url)
    assert fetch_rows(db_url, "SELECT count(*) FROM greek_snapshots_default") == [(10,)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert create_partition(conn, DAY)
    assert fetch_rows(db_url, f"SELECT count(*) FROM {PARTITION}") == [(10,)]
    assert _all_rows(db_url) == before
    assert fetch_rows(db_url, "SELECT DISTINCT market_data FROM greek_snapshots") == [("delayed",)]


async def test_packed_partition_holds_the_same_rows_in_fewer_pages(db_url: str) -> None:
    """Against a table in the parent's column order (how partitions were created before),
    same rows: in the parent's order a row pads the date and the first float8 to their
    alignment, packed it does not."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        create_partition(conn, DAY)
        conn.execute(f"CREATE TABLE old_layout (LIKE {PARENT} INCLUDING ALL)")
    rows = [make_snapshot(i, source="ibkr", source_payload=None) for i in range(6000)]
    await Writer(db_url).write_batch(rows)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO old_layout SELECT * FROM {PARENT}")
    # pages holding rows (COPY may extend the file by a few empty pages ahead)
    used = "SELECT count(DISTINCT (ctid::text::point)[0]), max(pg_column_size(t.*)) FROM {} t"
    (packed_pages, packed_row), (old_pages, old_row) = (
        fetch_rows(db_url, used.format(t))[0] for t in (PARTITION, "old_layout")
    )
    assert packed_row < old_row
    assert packed_pages < old_pages


async def test_keeper_compacts_a_closed_partition_once_and_keeps_every_row(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY, 1)
    await _write_interleaved(db_url)
    before, index_before = _all_rows(db_url), _index_bytes(db_url, PARTITION)
    stats = CompactionStats()
    with psycopg.connect(db_url, autocommit=True) as conn:
        done = compact_closed(conn, _closed_now(DAY), 5.0, stats)
        assert [c.partition for c in done] == [PARTITION]  # the next day is still open
        assert compact_closed(conn, _closed_now(DAY), 5.0, stats) == []  # once
    after = _index_bytes(db_url, PARTITION)
    assert after < index_before * 0.8
    assert _all_rows(db_url) == before
    assert (stats.compacted, stats.failed, stats.bytes_saved) == (1, 0, index_before - after)
    assert fetch_rows(
        db_url,
        "SELECT partition, index_bytes_before, index_bytes_after FROM greek_snapshots_compactions",
    ) == [(PARTITION, index_before, after)]
    valid = fetch_rows(
        db_url,
        "SELECT bool_and(indisvalid), count(*) FROM pg_index WHERE indrelid = %s::regclass",
        (PARTITION,),
    )
    assert valid == [(True, 2)]


async def test_a_partition_compacted_while_written_is_compacted_again_once_closed(
    db_url: str,
) -> None:
    now = datetime.now(UTC)
    start = now - timedelta(seconds=1)
    today = start.date()
    name = partition_name(today)
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, today, 0)
    await Writer(db_url).write_batch(
        [make_snapshot(i, event_time=start + timedelta(microseconds=i)) for i in range(500)]
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert [c.partition for c in compact_loaded(conn, today, today, 500, 5.0)] == [name]
        stats = CompactionStats()
        assert compact_closed(conn, now, 5.0, stats) == []  # not closed yet
        again = compact_closed(conn, _closed_now(today), 5.0, stats)
        assert [c.partition for c in again] == [name]


async def test_replay_compacts_what_it_loaded_unless_told_not_to(
    db_url: str, other_db_url: str
) -> None:
    compacted = await replay_fixture(db_url, FIXTURE)
    plain = await replay_fixture(other_db_url, FIXTURE, compact=False)
    assert compacted.rows_written == plain.rows_written > 0
    assert len(compacted.compacted) == 1 and plain.compacted == []
    name = compacted.compacted[0]
    assert _index_bytes(db_url, name) < _index_bytes(other_db_url, name)
    assert fetch_rows(db_url, "SELECT partition FROM greek_snapshots_compactions") == [(name,)]


async def test_replay_leaves_a_partition_it_barely_loaded(db_url: str) -> None:
    """A small load into a large day is not worth rebuilding the day's indexes."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY, 0)
    await _write_interleaved(db_url, 4000)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert compact_loaded(conn, DAY, DAY, 1000, 5.0) == []
        assert [c.partition for c in compact_loaded(conn, DAY, DAY, 2000, 5.0)] == [PARTITION]


async def test_leftovers_of_an_interrupted_rebuild_are_dropped(db_url: str) -> None:
    """A failed concurrent build leaves an invalid index that every write maintains."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY, 0)
    await _write_interleaved(db_url, 2000)
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                f"CREATE UNIQUE INDEX CONCURRENTLY {PARTITION}_idx_ccnew ON {PARTITION} (broker)"
            )
        invalid = "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND NOT indisvalid"
        assert conn.execute(invalid, (PARTITION,)).fetchone() == (1,)
        assert compact(conn, PARTITION, 5.0) is not None
        assert conn.execute(invalid, (PARTITION,)).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", (PARTITION,)
        ).fetchone() == (2,)


async def test_another_instance_compacting_means_this_one_skips(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY, 0)
    with (
        psycopg.connect(db_url, autocommit=True) as other,
        psycopg.connect(db_url, autocommit=True) as conn,
    ):
        other.execute("SELECT pg_advisory_lock(%s)", (COMPACT_LOCK,))
        stats = CompactionStats()
        assert compact_closed(conn, _closed_now(DAY), 5.0, stats) == []
        assert stats.compacted == 0
        other.execute("SELECT pg_advisory_unlock(%s)", (COMPACT_LOCK,))
        assert [c.partition for c in compact_closed(conn, _closed_now(DAY), 5.0, stats)] == [
            PARTITION
        ]


async def test_writes_go_on_while_a_rebuild_waits_and_runs(db_url: str) -> None:
    """REINDEX CONCURRENTLY waits for an open writing transaction without blocking the
    next writes into the same partition; every row is there afterwards."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY, 0)
    await _write_interleaved(db_url, 4000)
    with psycopg.connect(db_url) as open_txn, psycopg.connect(db_url, autocommit=True) as rebuild:
        open_txn.execute(
            "INSERT INTO greek_snapshots SELECT * FROM greek_snapshots"
            " WHERE event_time = (SELECT min(event_time) FROM greek_snapshots)"
            " ON CONFLICT DO NOTHING"
        )
        pid = rebuild.info.backend_pid
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, compact, rebuild, PARTITION, 30.0)

            def waiting() -> bool:
                rows = fetch_rows(
                    db_url,
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                    (pid,),
                )
                return rows == [("Lock",)]

            await wait_until(waiting, what="the rebuild to wait for the open transaction")
            with trio.fail_after(30):  # blocked writes would hang here
                await _write_interleaved(db_url, 2000, 4000)
            assert waiting()  # they went in while the rebuild still waited
            open_txn.commit()
    assert fetch_rows(db_url, "SELECT count(*) FROM greek_snapshots") == [(6000,)]
    assert fetch_rows(db_url, "SELECT partition FROM greek_snapshots_compactions") == [(PARTITION,)]


async def test_the_running_service_compacts_a_closed_day_and_reports_it(
    db_url: str, tmp_path: Path
) -> None:
    """The wiring, end to end: `greeksd run`'s keeper compacts a closed day on its first
    round, and /v1/streaming/status and /metrics say so."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY, 1)
    await _write_interleaved(db_url)
    index_before = _index_bytes(db_url, PARTITION)
    async with serve_api(db_url, tmp_path) as service:
        stats = service.state.compaction
        await wait_until(lambda: stats.compacted >= 1, timeout=60, what="keeper compaction")
        async with httpx.AsyncClient(base_url=service.api_url) as client:
            status = (await client.get("/v1/streaming/status")).json()
            metrics = (await client.get("/metrics")).text
    assert status["partitions"]["compacted"] == stats.compacted
    assert f"greeksd_partitions_compacted_total {stats.compacted}" in metrics
    assert _index_bytes(db_url, PARTITION) < index_before * 0.8
