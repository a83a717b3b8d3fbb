"""Schema migrations and daily partitions against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from greeksd.store.migrations import SCHEMA_DIR, MigrationError, migrate, status
from greeksd.store.partitions import create_partition, drop_expired, ensure_partitions
from greeksd.store.writer import Writer
from tests.factories import BASE_TIME, make_snapshot
from tests.helpers import fetch_rows


def test_fresh_database_gets_every_table_and_index(empty_db_url: str) -> None:
    assert migrate(empty_db_url) == [
        "001_init",
        "002_persisted_at_default",
        "003_data_quality",
        "004_sources",
        "005_compactions",
    ]
    tables = {
        r[0]
        for r in fetch_rows(
            empty_db_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert {"greek_snapshots_default", "trades", "schema_migrations"} <= tables
    partitioned = fetch_rows(
        empty_db_url, "SELECT relkind FROM pg_class WHERE relname = 'greek_snapshots'"
    )
    assert partitioned == [("p",)]
    indexes = {
        r[0]
        for r in fetch_rows(
            empty_db_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'greek_snapshots'"
        )
    }
    assert any("(event_time DESC)" in d for d in indexes)
    assert any("(broker, account_id, contract_key, event_time DESC" in d for d in indexes)
    assert status(empty_db_url) == [
        ("001_init", True),
        ("002_persisted_at_default", True),
        ("003_data_quality", True),
        ("004_sources", True),
        ("005_compactions", True),
    ]


def test_second_migrate_is_a_no_op(empty_db_url: str) -> None:
    migrate(empty_db_url)
    before = fetch_rows(empty_db_url, "SELECT version, applied_at FROM schema_migrations")
    assert migrate(empty_db_url) == []
    assert fetch_rows(empty_db_url, "SELECT version, applied_at FROM schema_migrations") == before


def test_edited_applied_migration_is_refused(empty_db_url: str, tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    schema.mkdir()
    (schema / "001_one.sql").write_text("CREATE TABLE one (id int);")
    migrate(empty_db_url, schema)
    (schema / "001_one.sql").write_text("CREATE TABLE one (id bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(empty_db_url, schema)


def test_failed_migration_leaves_nothing_half_applied(empty_db_url: str, tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    schema.mkdir()
    (schema / "001_bad.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")
    with pytest.raises(psycopg.Error):
        migrate(empty_db_url, schema)
    assert fetch_rows(empty_db_url, "SELECT to_regclass('half')") == [(None,)]
    assert fetch_rows(empty_db_url, "SELECT count(*) FROM schema_migrations") == [(0,)]


async def test_data_quality_column_reaches_existing_partitions_and_refuses_other_values(
    empty_db_url: str, tmp_path: Path
) -> None:
    """003 on a database that already holds rows in a daily partition and the default
    one: the column appears everywhere, old rows are NULL (unknown), new rows carry the
    flag, and a value other than live/delayed/frozen is refused."""
    before = tmp_path / "schema"
    before.mkdir()
    for name in ("001_init.sql", "002_persisted_at_default.sql"):
        (before / name).write_bytes((SCHEMA_DIR / name).read_bytes())
    migrate(empty_db_url, before)
    old = "INSERT INTO greek_snapshots (broker, account_id, contract_key, underlying,"
    old += " expiration, strike, option_type, event_time, received_at, fingerprint)"
    old += " VALUES ('ibkr', 'U1', 'AAPL 2026-12-18 C 190', 'AAPL', '2026-12-18', 190,"
    old += " 'C', %s, now(), 1)"
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        ensure_partitions(conn, date(2026, 11, 25), 0)
        conn.execute(old, (datetime(2026, 11, 25, 15, tzinfo=UTC),))
        conn.execute(old, (datetime(2031, 1, 1, tzinfo=UTC),))  # the default partition
    assert migrate(empty_db_url) == ["003_data_quality", "004_sources", "005_compactions"]
    columns = fetch_rows(
        empty_db_url,
        "SELECT table_name FROM information_schema.columns WHERE column_name = 'market_data'",
    )
    assert {c for (c,) in columns} == {
        "greek_snapshots",
        "greek_snapshots_p20261125",
        "greek_snapshots_default",
    }
    writer = Writer(empty_db_url)
    await writer.write_batch(
        [make_snapshot(1, market_data="delayed"), make_snapshot(2, market_data="frozen")]
    )
    rows = fetch_rows(
        empty_db_url, "SELECT market_data, count(*) FROM greek_snapshots GROUP BY 1 ORDER BY 1"
    )
    assert rows == [("delayed", 1), ("frozen", 1), (None, 2)]
    with (
        psycopg.connect(empty_db_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute(
            old.replace("fingerprint)", "fingerprint, market_data)").replace("1)", "2, 'stale')"),
            (datetime(2026, 11, 25, 16, tzinfo=UTC),),
        )


async def test_source_and_instance_columns_reach_existing_rows_and_stay_out_of_the_key(
    empty_db_url: str, tmp_path: Path
) -> None:
    """004 on a database that already holds a row: the row stays, with no source or
    instance (NULL: not known); new rows carry both; and the same values received by two
    sources on two instances are stored once (neither column is in the unique key)."""
    before = tmp_path / "schema"
    before.mkdir()
    for path in sorted(SCHEMA_DIR.glob("00[1-3]_*.sql")):
        (before / path.name).write_bytes(path.read_bytes())
    migrate(empty_db_url, before)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        ensure_partitions(conn, BASE_TIME.date(), 0)
        conn.execute(
            "INSERT INTO greek_snapshots (broker, account_id, contract_key, underlying,"
            " expiration, strike, option_type, event_time, received_at, fingerprint)"
            " VALUES ('ibkr', 'U1', 'AAPL 2026-12-18 C 190', 'AAPL', '2026-12-18', 190,"
            " 'C', %s, now(), 1)",
            (BASE_TIME - timedelta(seconds=1),),
        )
    assert migrate(empty_db_url) == ["004_sources", "005_compactions"]
    alice, bob = make_snapshot(1, source="ibkr:alice"), make_snapshot(1, source="ibkr:bob")
    await Writer(empty_db_url, instance="desk-1").write_batch([alice])
    await Writer(empty_db_url, instance="desk-2").write_batch([bob])
    rows = fetch_rows(
        empty_db_url, "SELECT source, instance FROM greek_snapshots ORDER BY event_time"
    )
    assert rows == [(None, None), ("ibkr:alice", "desk-1")]


async def test_far_future_row_lands_in_default_partition_and_moves_later(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, date(2026, 11, 25), 1)
    far = datetime(2031, 3, 4, 12, 0, tzinfo=UTC)
    writer = Writer(db_url)
    await writer.write_batch([make_snapshot(0), make_snapshot(1, event_time=far)])
    where = dict(
        fetch_rows(
            db_url, "SELECT tableoid::regclass::text, count(*) FROM greek_snapshots GROUP BY 1"
        )
    )
    assert where == {"greek_snapshots_p20261125": 1, "greek_snapshots_default": 1}
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert create_partition(conn, date(2031, 3, 4))
    where = dict(
        fetch_rows(
            db_url, "SELECT tableoid::regclass::text, count(*) FROM greek_snapshots GROUP BY 1"
        )
    )
    assert where == {"greek_snapshots_p20261125": 1, "greek_snapshots_p20310304": 1}


def test_expired_partitions_are_dropped_and_retention_zero_keeps_all(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, date(2026, 11, 1), 2)
        assert drop_expired(conn, date(2026, 11, 25), 0) == []
        dropped = drop_expired(conn, date(2026, 11, 25), 23)
    assert dropped == ["greek_snapshots_p20261101"]
