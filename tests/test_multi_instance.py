"""Several greeksd instances against one PostgreSQL database: schema and partition DDL
from many connections at the same moment (a barrier), as several instances starting
together do it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import trio

from greeksd.bench import scale
from greeksd.brokers.spec import BenchSim
from greeksd.cli import build_sources
from greeksd.config import load_settings
from greeksd.service import RunningService, open_service
from greeksd.sim.market import default_contracts
from greeksd.sim.readiness import wait_subscribed
from greeksd.store import ddl_lock
from greeksd.store.ddl_lock import SCHEMA_LOCK, SchemaLockBusy, schema_transaction
from greeksd.store.migrations import discover, migrate
from greeksd.store.partitions import (
    create_partition,
    drop_expired,
    ensure_partitions,
    existing_partitions,
)
from tests.helpers import fetch_rows, wait_until

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
        ensure_partitions(conn, DAY - timedelta(days=10), 10)
    # retention 1 day: everything before DAY - 1 is expired
    expired = [f"greek_snapshots_p{DAY - timedelta(days=d):%Y%m%d}" for d in range(10, 1, -1)]

    def drop() -> list[str]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return drop_expired(conn, DAY, 1)

    results = all_at_once(drop)
    assert _errors(results) == []
    dropped = [name for names in results if isinstance(names, list) for name in names]
    assert sorted(dropped) == expired, "each expired partition dropped by one instance"
    with psycopg.connect(db_url) as conn:
        kept = sorted(existing_partitions(conn))
    assert kept == [f"greek_snapshots_p{DAY - timedelta(days=d):%Y%m%d}" for d in (1, 0)]


def test_a_waiter_gives_up_on_a_stuck_holder_naming_it_then_succeeds(empty_db_url: str) -> None:
    """An instance frozen inside its schema transaction (here: a session that took the
    lock and went quiet) makes the others fail within their bound, saying who holds it;
    once it is gone they proceed."""
    with psycopg.connect(empty_db_url) as stuck:
        stuck.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        pid = stuck.info.backend_pid
        started = time.monotonic()
        with pytest.raises(SchemaLockBusy, match=rf"held by pid {pid},.*idle in transaction"):
            migrate(empty_db_url, lock_wait_s=0.5)
        with (
            psycopg.connect(empty_db_url, autocommit=True) as conn,
            pytest.raises(SchemaLockBusy, match=rf"creating greek_snapshots_p20261130.*{pid}"),
        ):
            create_partition(conn, DAY, lock_wait_s=0.5)
        assert time.monotonic() - started < 5, "each waiter gave up within its bound"
    assert migrate(empty_db_url, lock_wait_s=0.5) == [m.version for m in discover()]


def test_a_holder_frozen_inside_its_transaction_is_ended_by_the_server(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder whose process stops between statements does not keep the lock: the server
    ends its idle transaction and the next instance migrates."""
    monkeypatch.setattr(ddl_lock, "HOLDER_IDLE_S", 0.5)
    with (
        psycopg.connect(empty_db_url, autocommit=True) as frozen,
        pytest.raises(psycopg.Error),
        schema_transaction(frozen, 1.0, "frozen holder"),
    ):
        # the holder stops here; another instance waits up to 30 s for the lock
        assert migrate(empty_db_url, lock_wait_s=30) == [m.version for m in discover()]
        frozen.execute("SELECT 1")  # thawed: its session was ended meanwhile


async def test_three_services_started_together_on_a_new_database_store_every_row_once(
    empty_db_url: str, tmp_path: Path
) -> None:
    """Three real services (two IBKR gateways, one Tastytrade login, each simulator with an
    account of its own) start at the same moment against one database nobody migrated:
    all run, and every tick each simulator sent is stored exactly once."""
    book = default_contracts(datetime.now(UTC).date(), 20)
    go, stop = trio.Event(), trio.Event()
    services: dict[str, RunningService] = {}

    async with scale.open_fleet(book) as sims, trio.open_nursery() as nursery:

        async def instance(member: scale.Member, sim: BenchSim[Any]) -> None:
            data_dir = tmp_path / member.name
            env = scale.instance_env(member, sim, empty_db_url, data_dir)
            settings = load_settings(env | {"GREEKSD_FLUSH_MS": "20"}, dotenv_path=tmp_path / "x")
            await go.wait()
            async with open_service(settings, build_sources(settings)) as service:
                services[member.name] = service
                await stop.wait()

        for member, sim in sims.items():
            nursery.start_soon(instance, member, sim)
        go.set()
        await wait_until(lambda: len(services) == len(sims), timeout=60, what="all running")
        with trio.fail_after(60):
            await wait_subscribed(list(sims.values()), [c.key for c in book])
        for _ in range(20):
            for sim in sims.values():
                await sim.offer(5)
            await trio.sleep(0.01)  # pacing the offer, not waiting for anything
        sent = scale.sent(sims)
        assert all(count >= 100 for count in sent.values()), sent
        await wait_until(
            lambda: scale.stored(empty_db_url) == sent, timeout=30, what="every row stored"
        )
        for service in services.values():
            assert service.state.writer.stats.last_error is None
        stop.set()
    assert all(sim.dropped() == 0 for sim in sims.values())
    assert scale.stored(empty_db_url) == sent, "each row once, after the drain too"
    versions = fetch_rows(empty_db_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert [v for (v,) in versions] == [m.version for m in discover()]
