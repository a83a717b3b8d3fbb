"""Daily partitions of `greek_snapshots`: created ahead, dropped after retention.

A row for a day with no partition lands in the default partition. Creating that day's
partition later moves those rows into it in the same transaction, because PostgreSQL
refuses to attach a partition whose range the default partition already holds rows for.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import psycopg
from psycopg import sql

from greeksd.logs import get_logger

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


def create_partition(conn: psycopg.Connection, day: date) -> bool:
    """Create the partition for `day` (UTC) unless it exists; return True if created."""
    name = partition_name(day)
    lower = datetime.combine(day, time(), UTC)
    upper = lower + timedelta(days=1)
    with conn.transaction():
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,):
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


def ensure_partitions(conn: psycopg.Connection, today: date, days_ahead: int) -> list[str]:
    created = []
    for offset in range(days_ahead + 1):
        day = today + timedelta(days=offset)
        if create_partition(conn, day):
            created.append(partition_name(day))
    return created


def drop_expired(conn: psycopg.Connection, today: date, retention_days: int) -> list[str]:
    """Drop daily partitions entirely older than `retention_days`; 0 keeps everything."""
    if retention_days <= 0:
        return []
    cutoff = today - timedelta(days=retention_days)
    dropped = []
    for name, day in sorted(existing_partitions(conn).items(), key=lambda item: item[1]):
        if day < cutoff:
            with conn.transaction():
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            log.info("partition_dropped", partition=name)
            dropped.append(name)
    return dropped
