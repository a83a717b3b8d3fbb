"""Streaming reads on the API's connection pool, without holding a result in memory.

A page is read through a server-side cursor in one REPEATABLE READ, read-only
transaction: the boundary query (does a next page exist, where does this one end) and
the rows come from the same snapshot, so the `next` cursor handed out in the response
headers always matches the last row of the body. The blocking psycopg calls run in
worker threads; the trio side only sees an async iterator of row chunks.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import psycopg
import trio
from psycopg import IsolationLevel
from psycopg_pool import ConnectionPool

from greeksd.logs import get_logger
from greeksd.store.queries import Query

log = get_logger("greeksd.reads")

CHUNK_ROWS = 500

Row = tuple[Any, ...]


class RowStream:
    """One query's rows, chunk by chunk, on one pooled connection.

    `await start()` runs the queries (so a database error surfaces before any response
    header is sent); iterating yields chunks; the connection goes back to the pool when
    the iteration ends, is closed early, or the started generator is garbage-collected
    (trio finalizes it)."""

    def __init__(self, pool: ConnectionPool, rows: Query, boundary: Query | None = None) -> None:
        self._pool = pool
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
        conn = await trio.to_thread.run_sync(self._pool.getconn)
        try:
            cursor = await trio.to_thread.run_sync(self._open, conn)
            yield []
            while rows := await trio.to_thread.run_sync(cursor.fetchmany, CHUNK_ROWS):
                yield rows
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._release, conn)

    def _open(self, conn: psycopg.Connection) -> psycopg.ServerCursor:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        if self._boundary is not None:
            self.boundary_rows = conn.execute(*self._boundary).fetchall()
        cursor = conn.cursor(name="greeksd_page")
        cursor.execute(*self._rows)
        return cursor

    def _release(self, conn: psycopg.Connection) -> None:
        try:
            if not conn.closed:
                conn.rollback()
                conn.isolation_level = None
                conn.read_only = None
        except psycopg.Error as exc:
            log.warning("read_connection_reset_failed", error=str(exc).strip())
        finally:
            self._pool.putconn(conn)


async def open_rows(pool: ConnectionPool, rows: Query, boundary: Query | None = None) -> RowStream:
    stream = RowStream(pool, rows, boundary)
    await stream.start()
    return stream
