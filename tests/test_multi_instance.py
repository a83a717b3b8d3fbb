"""Several greeksd instances against one PostgreSQL database: schema and partition DDL
from many connections at the same moment (a barrier), as several instances starting
together do it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import date, timedelta
from typing import TypeVar

import psycopg

from greeksd.store.migrations import discover, migrate
from greeksd.store.partitions import drop_expired, ensure_partitions, existing_partitions
from tests.helpers import fetch_rows

T = TypeVar("T")
INSTANCES = 6
DAY = date(2026, 11, 30)  # the day of the reported UniqueViolation


def all_at_once(work: Callable[[], T], count: int = INSTANCES) -> list[T | BaseException]:
    """Run `work` in `count` threads released together by a barrier; what each returned
    or raised."""
    barrier = threading.Barrier(count)
    results: list[T | BaseException] = [RuntimeError("did not finish")] * count

    def one(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work()
        except Exception as exc:  # collected, asserted on below
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _errors(results: list[T | BaseException]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException)]


def test_instances_creating_the_same_partitions_together_create_each_once(db_url: str) -> None:
    def create() -> list[str]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return ensure_partitions(conn, DAY, 3)

    results = all_at_once(create)
    assert _errors(results) == []
    created = [name for names in results if isinstance(names, list) for name in names]
    wanted = [f"greek_snapshots_p{DAY + timedelta(days=d):%Y%m%d}" for d in range(4)]
    assert sorted(created) == wanted, "each partition created by exactly one instance"
    with psycopg.connect(db_url) as conn:
        assert sorted(existing_partitions(conn)) == wanted


def test_instances_migrating_a_fresh_database_together_apply_each_migration_once(
    empty_db_url: str,
) -> None:
    results = all_at_once(lambda: migrate(empty_db_url))
    assert _errors(results) == []
    applied = [v for versions in results if isinstance(versions, list) for v in versions]
    assert sorted(applied) == [m.version for m in discover()]
    rows = fetch_rows(empty_db_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert [v for (v,) in rows] == [m.version for m in discover()]


def test_instances_applying_retention_together_drop_each_partition_once(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        ensure_partitions(conn, DAY - timedelta(days=10), 10)  # ten expired + DAY
    expired = [f"greek_snapshots_p{DAY - timedelta(days=d):%Y%m%d}" for d in range(10, 0, -1)]

    def drop() -> list[str]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return drop_expired(conn, DAY, 1)

    results = all_at_once(drop)
    assert _errors(results) == []
    dropped = [name for names in results if isinstance(names, list) for name in names]
    assert sorted(dropped) == expired, "each expired partition dropped by one instance"
    with psycopg.connect(db_url) as conn:
        assert sorted(existing_partitions(conn)) == [f"greek_snapshots_p{DAY:%Y%m%d}"]
