"""One database, many greeksd instances: the advisory locks that keep their DDL apart.

Every instance migrates and keeps the daily partitions, at start and hourly. Two doing
the same DDL at once collide in the catalog: two sessions creating one partition fail
with UniqueViolation on pg_type (the issue-15 crash at start), two dropping one fail
with UndefinedTable. So:

- schema DDL (each migration, each partition created or dropped) runs in a transaction
  that first takes the transaction-scoped advisory lock SCHEMA_LOCK, then re-checks
  whether the work is still to do (whoever waited finds it done);
- retention try-locks RETENTION_LOCK: whoever gets it drops, the others skip;
- index compaction (greeksd.store.compaction) try-locks COMPACT_LOCK for its session
  (REINDEX CONCURRENTLY cannot run inside a transaction): one compacts, the others skip.

Transaction-scoped locks end with the transaction (commit, rollback, or the session
dying), so there is no unlock to forget, a crashed holder frees the lock at once, and
they work through a transaction-mode pooler. SCHEMA_LOCK is the key older greeksd
versions took as a session lock around migrations, so they are kept apart too.

No wait is unbounded: the wait for the lock has a `lock_timeout` (and, in the service,
the session's statement_timeout and the client deadline around the call), after which
SchemaLockBusy names the holder; it is an OperationalError, so the service treats it
like an unreachable database (start anyway, spool, retry). A holder sets
`idle_in_transaction_session_timeout`: if its process freezes between statements, the
server ends its session and the lock is released.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from psycopg import errors

# Shared by every greeksd process on a database (advisory locks are per database).
SCHEMA_LOCK = 0x67726B73  # 'grks'; older versions' migration lock
RETENTION_LOCK = 0x67726B74
COMPACT_LOCK = 0x67726B75
LOCK_WAIT_S = 30.0  # how long a waiter waits when its caller names no bound
HOLDER_IDLE_S = 30.0  # a holder idle this long inside its transaction is ended by the server


class SchemaLockBusy(psycopg.OperationalError):
    """Another session held the schema lock for longer than this one would wait."""


def hold(conn: psycopg.Connection, key: int, wait_s: float, what: str) -> None:
    """Inside a transaction: take advisory lock `key` until the transaction ends, waiting
    at most `wait_s`; SchemaLockBusy (naming the holder) if that is not enough."""
    row = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
    previous = row[0] if row else "0"
    try:
        with conn.transaction():  # a savepoint: a wait that gives up leaves ours usable
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (_ms(wait_s),))
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
    except (errors.LockNotAvailable, errors.QueryCanceled) as exc:
        raise SchemaLockBusy(
            f"{what}: another session held the schema lock for over {wait_s:g} s"
            f" ({holder(conn, key)}); will retry"
        ) from exc
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))
    conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
        (_ms(HOLDER_IDLE_S),),
    )


@contextlib.contextmanager
def schema_transaction(conn: psycopg.Connection, wait_s: float, what: str) -> Iterator[None]:
    """A transaction holding SCHEMA_LOCK: the block's DDL runs alone on the database."""
    with conn.transaction():
        hold(conn, SCHEMA_LOCK, wait_s, what)
        yield


def try_hold(conn: psycopg.Connection, key: int) -> bool:
    """Inside a transaction: take advisory lock `key` if free (until the transaction ends)."""
    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
    return bool(row and row[0])


def holder(conn: psycopg.Connection, key: int) -> str:
    """Who holds advisory lock `key` on this database, for the error message."""
    row = conn.execute(
        "SELECT a.pid, a.application_name, a.client_addr::text, a.state,"
        " extract(epoch FROM now() - a.xact_start)::float8"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid::text::bigint = %s AND l.objid::text::bigint = %s",
        (key >> 32, key & 0xFFFFFFFF),
    ).fetchone()
    if row is None:
        return "released meanwhile"
    pid, app, client, state, held_s = row
    return (
        f"held by pid {pid}, application {app or '-'!r}, client {client or 'local socket'},"
        f" {state or 'unknown state'}, transaction open {held_s or 0:.1f} s"
    )


def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"
