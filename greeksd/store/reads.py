"""Reads on the API's own connection pool: admission, worker threads, streaming pages.

Admission. API reads must never stall ingestion nor queue for seconds: every read first
takes one of `ReadPool.slots` (a `trio.CapacityLimiter` sized to the pool, one token per
pooled connection, held for as long as the request holds its connection — a streamed
page included). A request that finds every slot taken waits at most `admit_wait_s`
(well under a second) and then fails with `ReadsBusy` (the API answers 503 with
`Retry-After`), instead of piling up on the pool's timeout. The blocking psycopg calls run
in worker threads under `ReadPool.threads`, the reads' own limiter: never trio's default
one, which the writer and everything else share.

Streaming. A page is read through a server-side cursor in one REPEATABLE READ, read-only
transaction: the boundary query (does a next page exist, where does this one end) and
the rows come from the same snapshot, so the `next` cursor handed out in the response
headers always matches the last row of the body. The trio side only sees an async
iterator of row chunks.

Defensive loading. A stored date or timestamp Python cannot represent (before year 1 or
after 9999, `infinity`) loads as PostgreSQL's own text instead of failing the whole
page: one odd row never breaks a listing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import IsolationLevel, abc
from psycopg.adapt import Loader
from psycopg_pool import ConnectionPool

from greeksd.logs import get_logger
from greeksd.store.queries import Query

log = get_logger("greeksd.reads")

CHUNK_ROWS = 500

Row = tuple[Any, ...]
T = TypeVar("T")


class ReadsBusy(Exception):
    """Every read slot stayed taken for `admit_wait_s`: answer 503, retry shortly."""


@dataclass
class Refusals:
    """Requests turned away with a 503 because something was saturated, by reason.
    Logged at most once a second per reason (with the count since the last line): a
    burst of refusals must not turn into a burst of log lines."""

    total: Counter[str] = field(default_factory=Counter)
    _unlogged: Counter[str] = field(default_factory=Counter)
    _logged_at: dict[str, float] = field(default_factory=dict)

    def note(self, reason: str, **fields: Any) -> None:
        self.total[reason] += 1
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -math.inf) >= 1.0:
            log.warning("api_busy_refused", reason=reason, refused=self._unlogged[reason], **fields)
            self._unlogged[reason] = 0
            self._logged_at[reason] = now


@dataclass
class ReadPool:
    """The pool plus the limiters that keep API reads bounded and off trio's default
    thread limiter. `slots` and `threads` both have one token per pooled connection: at
    most `size` requests hold a connection, each runs at most one blocking call at a
    time, so a call never waits for a thread."""

    pool: ConnectionPool
    size: int
    admit_wait_s: float
    slots: trio.CapacityLimiter = field(init=False)
    threads: trio.CapacityLimiter = field(init=False)
    refusals: Refusals = field(default_factory=Refusals)  # also the HTTP gate's

    def __post_init__(self) -> None:
        self.slots = trio.CapacityLimiter(self.size)
        self.threads = trio.CapacityLimiter(self.size)

    async def admit(self, borrower: object) -> None:
        """Take a slot for `borrower` (released with `release`), or raise ReadsBusy."""
        with trio.move_on_after(self.admit_wait_s):
            await self.slots.acquire_on_behalf_of(borrower)
            return
        self.refusals.note("reads_busy", slots=self.size, waited_s=self.admit_wait_s)
        raise ReadsBusy(f"all {self.size} read connections are busy")

    def release(self, borrower: object) -> None:
        self.slots.release_on_behalf_of(borrower)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call in a worker thread on the reads' own limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.threads)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.Connection]:
        """A slot and a pooled connection for the block; run blocking calls on it with
        `run`. The transaction is committed when the block ends cleanly."""
        borrower = object()
        await self.admit(borrower)
        try:
            conn = await self.run(self.pool.getconn)
            try:
                yield conn
                await self.run(conn.commit)
            finally:
                with trio.CancelScope(shield=True):
                    await self.run(self._putback, conn)
        finally:
            self.release(borrower)

    def _putback(self, conn: psycopg.Connection) -> None:
        try:
            if not conn.closed:
                conn.rollback()
                conn.isolation_level = None
                conn.read_only = None
        except psycopg.Error as exc:
            log.warning("read_connection_reset_failed", error=str(exc).strip())
        finally:
            self.pool.putconn(conn)


class RowStream:
    """One query's rows, chunk by chunk, on one pooled connection.

    `await start()` takes a read slot and runs the queries (so a busy or failing
    database surfaces before any response header is sent); iterating yields chunks; the
    connection and the slot go back when the iteration ends, is closed early, or the
    started generator is garbage-collected (trio finalizes it)."""

    def __init__(self, reads: ReadPool, rows: Query, boundary: Query | None = None) -> None:
        self._reads = reads
        self._rows = rows
        self._boundary = boundary
        self.boundary_rows: list[Row] = []
        self._gen = self._run()

    async def start(self) -> None:
        first = await self._gen.__anext__()
        assert first == [], "the first chunk only marks that the query is open"

    def __aiter__(self) -> AsyncIterator[list[Row]]:
        return self._gen

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def _run(self) -> AsyncGenerator[list[Row], None]:
        async with self._reads.connection() as conn:
            cursor = await self._reads.run(self._open, conn)
            yield []
            while rows := await self._reads.run(cursor.fetchmany, CHUNK_ROWS):
                yield rows

    def _open(self, conn: psycopg.Connection) -> psycopg.ServerCursor:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        if self._boundary is not None:
            self.boundary_rows = conn.execute(*self._boundary).fetchall()
        cursor = conn.cursor(name="greeksd_page")
        cursor.execute(*self._rows)
        return cursor


async def open_rows(reads: ReadPool, rows: Query, boundary: Query | None = None) -> RowStream:
    stream = RowStream(reads, rows, boundary)
    await stream.start()
    return stream


def _text_fallback(base: type[abc.Loader]) -> type[Loader]:
    """`base` (psycopg's optimised loader, which cannot be subclassed) wrapped so that a
    value it refuses comes back as its text."""

    class TextFallback(Loader):
        def __init__(self, oid: int, context: abc.AdaptContext | None = None) -> None:
            super().__init__(oid, context)
            self._inner = base(oid, context)

        def load(self, data: abc.Buffer) -> Any:
            try:
                return self._inner.load(data)
            except psycopg.DataError:
                return bytes(data).decode()

    return TextFallback


def load_out_of_range_times_as_text(conn: psycopg.Connection) -> None:
    """Register loaders on `conn` that give PostgreSQL's text for a date or timestamp
    Python cannot hold, instead of raising (text results; the API's cursors are text)."""
    for name in ("date", "timestamp", "timestamptz"):
        info = psycopg.adapters.types[name]
        base = conn.adapters.get_loader(info.oid, psycopg.pq.Format.TEXT)
        assert base is not None, name
        conn.adapters.register_loader(info.oid, _text_fallback(base))
