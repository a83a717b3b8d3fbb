"""Compacting a daily partition's indexes once it is no longer written.

Rows arrive in time order for many contracts at once, so each insert into the contract
index (`broker, account_id, contract_key, event_time DESC, fingerprint`) lands in the
middle of the index, next to that contract's latest entry; the leaf page splits 50/50 and
the half that holds older entries is never written again. The index ends ~52 % full:
~134 bytes a row for entries of ~68. (PostgreSQL packs only at the right edge, or for
entries of at most two 8-byte keys.) Rebuilt once the partition is no longer written, it
is packed at the B-tree fill factor (90 %): the two indexes go from ~154 to ~96 bytes a
row on the bench's rows.

The rebuild is `REINDEX TABLE CONCURRENTLY` of the partition: new indexes are built
beside the old ones and swapped in, holding SHARE UPDATE EXCLUSIVE on the partition, so
reads, COPY and inserts (a late row, a replay) go on; only DDL on that partition (a
retention drop) waits. It cannot run inside a transaction, so:

- one instance compacts at a time: the session-scoped try-lock COMPACT_LOCK; the others
  skip the round;
- a rebuild that fails or is interrupted (cancelled, connection lost) leaves invalid
  `*_ccnew` / `*_ccold` indexes, which every write still maintains: they are dropped right
  after a failure when the session still works, and under the lock before each rebuild;
- each compacted partition is recorded in `greek_snapshots_compactions` (migration 005),
  so the keeper compacts a closed partition once. `greeksd replay` compacts what it
  loaded (`compact_loaded`), closed or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from greeksd.logs import get_logger
from greeksd.store.ddl_lock import COMPACT_LOCK
from greeksd.store.partitions import existing_partitions, partition_name

log = get_logger("greeksd.compaction")

CLOSED_AFTER = timedelta(hours=1)  # a day's partition is closed this long after midnight
LOADED_SHARE = 0.5  # replay compacts a partition when its rows are at least this share

_INDEX_BYTES = "SELECT pg_indexes_size(%s::regclass)::bigint"
# Invalid indexes a failed REINDEX CONCURRENTLY left on the partition.
_LEFTOVERS = """
SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = %s::regclass AND NOT i.indisvalid
  AND (c.relname ~ '_ccnew[0-9]*$' OR c.relname ~ '_ccold[0-9]*$')"""


@dataclass
class CompactionStats:
    """The keeper's compaction counters (status `partitions`, /metrics)."""

    compacted: int = 0
    failed: int = 0
    bytes_saved: int = 0
    last_partition: str | None = None
    last_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "compacted": self.compacted,
            "compaction_failures": self.failed,
            "compaction_bytes_saved": self.bytes_saved,
            "last_compacted": self.last_partition,
            "last_compaction_error": self.last_error,
        }


@dataclass(frozen=True)
class Compaction:
    partition: str
    rows_estimate: int
    index_bytes_before: int
    index_bytes_after: int
    seconds: float


def closes_at(day: date) -> datetime:
    """When `day`'s partition is no longer written by the live streams."""
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC) + CLOSED_AFTER


def compacted(conn: psycopg.Connection) -> dict[str, datetime]:
    """When each recorded partition was last compacted."""
    rows = conn.execute("SELECT partition, compacted_at FROM greek_snapshots_compactions")
    return dict(rows.fetchall())


def _int(conn: psycopg.Connection, query: str, *params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def drop_leftovers(conn: psycopg.Connection, name: str) -> list[str]:
    """Drop the invalid indexes an interrupted rebuild of `name` left (no rebuild of it
    may be running: the caller holds COMPACT_LOCK)."""
    dropped = [index for (index,) in conn.execute(_LEFTOVERS, (name,)).fetchall()]
    for index in dropped:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index)))
        log.warning("compaction_leftover_dropped", partition=name, index=index)
    return dropped


def compact(conn: psycopg.Connection, name: str, lock_wait_s: float) -> Compaction | None:
    """Rebuild partition `name`'s indexes packed and record it. `conn` is in autocommit
    and has no statement timeout (a rebuild takes as long as the partition is big);
    waiting for a lock on the partition gives up after `lock_wait_s`. None: another
    instance is compacting (this one skips)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (COMPACT_LOCK,)).fetchone()
    if not row or not row[0]:
        log.info("compaction_skipped", partition=name, reason="another instance is compacting")
        return None
    try:
        drop_leftovers(conn, name)
        before = _int(conn, _INDEX_BYTES, name)
        started = time.monotonic()
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false)", (f"{int(lock_wait_s * 1000)}ms",)
        )
        try:
            conn.execute(sql.SQL("REINDEX TABLE CONCURRENTLY {}").format(sql.Identifier(name)))
        except psycopg.Error:
            if not conn.closed and not conn.broken:
                drop_leftovers(conn, name)
            raise
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("RESET lock_timeout")
        result = Compaction(
            name,
            _int(conn, "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", name),
            before,
            _int(conn, _INDEX_BYTES, name),
            time.monotonic() - started,
        )
        conn.execute(
            "INSERT INTO greek_snapshots_compactions"
            " (partition, rows_estimate, index_bytes_before, index_bytes_after)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (partition) DO UPDATE SET"
            " compacted_at = now(), rows_estimate = excluded.rows_estimate,"
            " index_bytes_before = excluded.index_bytes_before,"
            " index_bytes_after = excluded.index_bytes_after",
            (name, result.rows_estimate, before, result.index_bytes_after),
        )
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (COMPACT_LOCK,))
    log.info(
        "partition_compacted",
        partition=name,
        rows_estimate=result.rows_estimate,
        index_bytes_before=before,
        index_bytes_after=result.index_bytes_after,
        seconds=round(result.seconds, 2),
    )
    return result


def compact_closed(
    conn: psycopg.Connection, now: datetime, lock_wait_s: float, stats: CompactionStats
) -> list[Compaction]:
    """The keeper's round: compact each closed daily partition not compacted since it
    closed (a replay may have compacted it while it was still written), oldest first. A
    failure is logged and counted and ends the round (retried next round)."""
    done = compacted(conn)
    results = []
    for name, day in sorted(existing_partitions(conn).items(), key=lambda item: item[1]):
        closed = closes_at(day)
        if closed > now or (name in done and done[name] >= closed):
            continue
        try:
            result = compact(conn, name, lock_wait_s)
        except psycopg.Error as exc:
            stats.failed += 1
            stats.last_error = f"{name}: {type(exc).__name__}: {str(exc).strip()}"
            log.error(
                "compaction_failed", partition=name, error=stats.last_error, retry="next round"
            )
            raise
        if result is None:
            break
        stats.compacted += 1
        stats.bytes_saved += result.index_bytes_before - result.index_bytes_after
        stats.last_partition = name
        results.append(result)
    return results


def compact_loaded(
    conn: psycopg.Connection, first: date, last: date, rows_loaded: int, lock_wait_s: float
) -> list[Compaction]:
    """After a bulk load (`greeksd replay`) of `rows_loaded` rows dated `first`..`last`:
    compact each of those days' partitions whose rows are at least LOADED_SHARE loaded
    rows, so the rebuild costs at most about twice the load, never a full rebuild of a
    large live day for a small replay. Planner statistics are refreshed first (ANALYZE:
    a sample, cheap), which also tells how many rows each partition holds."""
    present = {name for name in existing_partitions(conn)}
    results = []
    day = first
    while day <= last:
        name = partition_name(day)
        day += timedelta(days=1)
        if name not in present:
            continue
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
        rows = _int(conn, "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", name)
        if rows <= 0 or rows_loaded < LOADED_SHARE * rows:
            log.info(
                "compaction_skipped",
                partition=name,
                rows_estimate=rows,
                loaded=rows_loaded,
                reason="the replay loaded too small a share of it",
            )
            continue
        result = compact(conn, name, lock_wait_s)
        if result is not None:
            results.append(result)
    return results
