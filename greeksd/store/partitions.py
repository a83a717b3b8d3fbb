"""Daily partitions of `greek_snapshots`: created ahead, dropped after retention.

A row for a day with no partition lands in the default partition. Creating that day's
partition later moves those rows into it in the same transaction, because PostgreSQL
refuses to attach a partition whose range the default partition already holds rows for.

Every instance on a database does this upkeep, so each creation and each drop holds the
schema lock and re-checks under it (greeksd.store.ddl_lock): a partition is created
once, by whoever gets there first; retention is applied by whichever instance gets the
retention lock, the others skip.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import psycopg
from psycopg import sql

from greeksd.logs import get_logger
from greeksd.store.ddl_lock import (
    LOCK_WAIT_S,
    RETENTION_LOCK,
    SCHEMA_LOCK,
    hold,
    schema_transaction,
    try_hold,
)

log = get_logger("greeksd.partitions")

PARENT = "greek_snapshots"
DEFAULT = "greek_snapshots_default"


def partition_name(day: date) -> str:
    return f"{PARENT}_p{day:%Y%m%d}"


def existing_partitions(conn: psycopg.Connection) -> dict[str, date]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass",
        (PARENT,),
    ).fetchall()
    days: dict[str, date] = {}
    for (name,) in rows:
        if name.startswith(f"{PARENT}_p"):
            days[name] = datetime.strptime(name[len(PARENT) + 2 :], "%Y%m%d").date()
    return days


def _exists(conn: psycopg.Connection, name: str) -> bool:
    """Whether table `name` exists, by a query on pg_class (this statement's snapshot),
    not to_regclass: that reads the backend's catalog cache, which taking an advisory
    lock does not refresh, so it can miss a table another instance just committed."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = %s AND n.nspname = current_schema())",
        (name,),
    ).fetchone()
    return bool(row and row[0])


def create_partition(conn: psycopg.Connection, day: date, lock_wait_s: float = LOCK_WAIT_S) -> bool:
    """Create the partition for `day` (UTC) unless it exists; return True if created
    (by this call). Waits at most `lock_wait_s` for another instance's DDL."""
    name = partition_name(day)
    if _exists(conn, name):  # the usual case, without taking the lock
        return False
    lower = datetime.combine(day, time(), UTC)
    upper = lower + timedelta(days=1)
    with schema_transaction(conn, lock_wait_s, f"creating {name}"):
        if _exists(conn, name):  # another instance created it while we waited
            return False
        ident = sql.Identifier(name)
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                ident, sql.Identifier(PARENT)
            )
        )
        moved = conn.execute(
            sql.SQL(
                "WITH moved AS (DELETE FROM {} WHERE event_time >= %s AND event_time < %s"
                " RETURNING *) INSERT INTO {} SELECT * FROM moved"
            ).format(sql.Identifier(DEFAULT), ident),
            (lower, upper),
        ).rowcount
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(PARENT), ident, sql.Literal(lower), sql.Literal(upper)
            )
        )
    log.info("partition_created", partition=name, moved_from_default=moved)
    return True


def ensure_partitions(
    conn: psycopg.Connection, today: date, days_ahead: int, lock_wait_s: float = LOCK_WAIT_S
) -> list[str]:
    """Partitions for today and `days_ahead` days after; the ones this call created."""
    created = []
    for offset in range(days_ahead + 1):
        day = today + timedelta(days=offset)
        if create_partition(conn, day, lock_wait_s):
            created.append(partition_name(day))
    return created


def drop_expired(
    conn: psycopg.Connection, today: date, retention_days: int, lock_wait_s: float = LOCK_WAIT_S
) -> list[str]:
    """Drop daily partitions entirely older than `retention_days`; 0 keeps everything.
    Returns the ones this call dropped: none if another instance is applying retention
    right now (it drops them)."""
    if retention_days <= 0:
        return []
    cutoff = today - timedelta(days=retention_days)
    dropped: list[str] = []
    for name, day in sorted(existing_partitions(conn).items(), key=lambda item: item[1]):
        if day >= cutoff:
            continue
        with conn.transaction():  # one partition per transaction: short parent locks
            if not try_hold(conn, RETENTION_LOCK):
                log.info("retention_skipped", reason="another instance is applying retention")
                return dropped
            hold(conn, SCHEMA_LOCK, lock_wait_s, f"dropping {name}")
            if not _exists(conn, name):  # the other instance dropped it before us
                continue
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        log.info("partition_dropped", partition=name)
        dropped.append(name)
    return dropped
