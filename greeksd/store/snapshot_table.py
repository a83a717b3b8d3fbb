"""Database attempts for snapshots: one bounded COPY of a batch, one bounded probe.

Each batch is one transaction of binary COPY straight into `greek_snapshots`. The unique
index on (broker, account, contract, event_time, fingerprint-of-values) refuses a batch
that holds a row already stored (a retry after an ambiguous commit, a replayed fixture,
a broker re-sending a tick); that batch is then written again through a temporary
staging table with `INSERT … SELECT … ON CONFLICT DO NOTHING`, which stores only the new
rows. So the common case costs one COPY, and any batch can be retried after any failure
without asking whether the previous attempt committed.

psycopg's sync API runs in a worker thread (trio.to_thread): measured as fast as the
asyncio API through trio-asyncio on the same COPY (greeksd/bench/writer_paths.py, the
README), and a thread is what lets a hung call be bounded and abandoned. The
threads take their own `CapacityLimiter(1)`, never trio's default one that the API's
reads share. Every call is bounded (greeksd/store/deadline.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import psycopg
import trio

from greeksd.model import Snapshot
from greeksd.store.columns import COPY_COLUMNS, COPY_SIGNATURE, COPY_TRAILER, encode_row
from greeksd.store.deadline import CLIENT_GRACE_S, Link, Watch, call_bounded, with_timeouts

_COLUMN_LIST = ", ".join(COPY_COLUMNS)
COPY_DIRECT = f"COPY greek_snapshots ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS snapshot_staging ON COMMIT DELETE ROWS AS "
    f"SELECT {_COLUMN_LIST} FROM greek_snapshots WITH NO DATA"
)
COPY_STAGING = f"COPY snapshot_staging ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
INSERT_FROM_STAGING = (
    f"INSERT INTO greek_snapshots ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM snapshot_staging "
    "ON CONFLICT DO NOTHING"
)
# What the probe asks before the writer tries again: the lock a COPY into the table needs.
# A bare `SELECT 1` would call a locked table healthy and send the writer back into the
# same wait.
PROBE_WRITE_LOCK = "LOCK TABLE greek_snapshots IN ROW EXCLUSIVE MODE"
COPY_CHUNK_ROWS = 1000  # rows encoded and handed to psycopg at a time (~120 kB lean)


class CopyRows:
    """A batch as binary COPY data (`encode_row`), encoded chunk by chunk as the COPY
    sends it, in the worker thread that runs the COPY.

    Encoding the whole batch on the trio thread before handing it over left PostgreSQL
    idle for that time (~4 µs a row, 20 ms for 5,000 rows) between one COPY and the next,
    and kept the trio thread from decoding meanwhile. Here the server already ingests the
    first chunk while the next one is encoded, and the trio thread shares the GIL with
    the encoding instead of waiting for it. Encoded chunks are kept: the staging pass
    after a duplicate, and a retry after a failure, send the same bytes. Only one thread
    uses it at a time (the table's `CapacityLimiter(1)`); the snapshots must not change
    while it exists."""

    __slots__ = ("_chunks", "_instance", "_snapshots")

    def __init__(self, snapshots: Sequence[Snapshot], instance: str | None = None) -> None:
        self._snapshots = snapshots
        self._instance = instance
        self._chunks: list[bytes] = []

    def __len__(self) -> int:
        return len(self._snapshots)

    def chunks(self) -> Iterator[bytes]:
        """The rows' binary COPY tuples, `COPY_CHUNK_ROWS` at a time."""
        snapshots, instance, done = self._snapshots, self._instance, self._chunks
        for number, start in enumerate(range(0, len(snapshots), COPY_CHUNK_ROWS)):
            if number == len(done):
                part = snapshots[start : start + COPY_CHUNK_ROWS]
                done.append(b"".join([encode_row(s, instance) for s in part]))
            yield done[number]


def copy_rows(cur: psycopg.Cursor[Any], statement: str, chunks: Iterable[bytes]) -> None:
    """Binary COPY of `encode_row` rows (joined into chunks, e.g. `CopyRows.chunks()`)
    through `statement` (COPY_DIRECT/STAGING): psycopg only frames and sends them."""
    with cur.copy(statement) as copy:
        copy.write(COPY_SIGNATURE)
        for chunk in chunks:
            copy.write(chunk)
        copy.write(COPY_TRAILER)


class SnapshotTable:
    """The writer's one connection to `greek_snapshots`, used only through bounded calls.
    Raises psycopg errors (DatabaseTimeout for a call past its deadline) to the caller,
    which owns the retry policy."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        connect: Callable[[str], psycopg.Connection] | None = None,
    ) -> None:
        self._url = with_timeouts(url, timeout_s)
        self._connect = connect or psycopg.connect
        # statement_timeout on the server; the client gives up a little later, so a lock
        # wait ends cleanly server-side and only a silent server is cut off by the client.
        self._statement_timeout_s = timeout_s
        self.deadline_s = timeout_s + CLIENT_GRACE_S
        self._limiter = trio.CapacityLimiter(1)
        self._link: Link | None = None

    async def write(self, rows: CopyRows) -> int:
        """One bounded attempt; returns the rows inserted (the rest were duplicates).
        The worker thread owns the connection while it runs; after a timeout it keeps
        it, fails on the severed socket and closes it, and the next attempt connects
        afresh: two threads never share a connection."""
        link, self._link = self._link, None
        link, inserted = await call_bounded(
            partial(self._write_sync, link, rows), self.deadline_s, self._limiter
        )
        self._link = link
        return inserted

    async def probe(self) -> None:
        """Take the lock a COPY needs on a fresh connection, bounded like every call."""
        await call_bounded(self._probe_sync, self.deadline_s, self._limiter)

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _probe_sync(self, watch: Watch) -> None:
        link = watch.open(self._connect, self._url, self._statement_timeout_s)
        try:
            link.conn.execute(PROBE_WRITE_LOCK)
            link.conn.rollback()
        finally:
            link.close()

    def _write_sync(self, link: Link | None, rows: CopyRows, watch: Watch) -> tuple[Link, int]:
        """COPY straight into the table; if a row is already stored, write the batch
        again through staging + ON CONFLICT DO NOTHING. Returns the connection (for the
        next batch) and the rows inserted; on any failure closes the connection."""
        if link is not None and link.conn.closed:
            link.close()
            link = None
        if link is None:
            link = watch.open(self._connect, self._url, self._statement_timeout_s)
            fresh = True
        else:
            watch.use(link)
            fresh = False
        conn = link.conn
        try:
            if fresh:
                conn.execute(CREATE_STAGING)
                conn.commit()
            try:
                with conn.cursor() as cur:
                    copy_rows(cur, COPY_DIRECT, rows.chunks())
                conn.commit()
                return link, len(rows)
            except psycopg.errors.UniqueViolation:
                conn.rollback()
            with conn.cursor() as cur:
                copy_rows(cur, COPY_STAGING, rows.chunks())
                cur.execute(INSERT_FROM_STAGING)
                inserted = cur.rowcount
            conn.commit()
        except BaseException:
            link.close()
            raise
        return link, inserted
