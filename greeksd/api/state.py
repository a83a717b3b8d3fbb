"""What the HTTP layer may see of the running service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import trio
from psycopg_pool import ConnectionPool
from quart import current_app

from greeksd.config import Settings
from greeksd.sink import ChannelSink
from greeksd.store.trade_writer import TradeWriter
from greeksd.store.writer import Writer
from greeksd.supervisor import Supervisor

# The API's own connections: reads (one per request, a streamed page at most) and the rare
# strategy-log insert. A small pool keeps them off the writer's connection without
# holding many server backends.
READ_POOL_MAX = 4
# How long a request waits for a pooled connection (or for the server) before it gets a
# 503 instead of hanging.
READ_POOL_TIMEOUT_S = 5.0


def _utc_session(conn: psycopg.Connection) -> None:
    """Times come back in UTC whatever the server's default zone."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()


@contextlib.asynccontextmanager
async def open_read_pool(
    url: str, *, wait_s: float = READ_POOL_TIMEOUT_S
) -> AsyncIterator[ConnectionPool]:
    """The API's read connections, opened lazily (a database that is down at start-up
    makes requests fail with 503, not the service) and closed with the service."""
    pool: ConnectionPool = ConnectionPool(
        url,
        min_size=1,
        max_size=READ_POOL_MAX,
        open=False,
        timeout=wait_s,
        kwargs={"connect_timeout": 5},
        check=ConnectionPool.check_connection,
        configure=_utc_session,
        name="greeksd-reads",
    )
    await trio.to_thread.run_sync(lambda: pool.open(wait=False))
    try:
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: pool.close(timeout=5.0))


@dataclass
class ServiceState:
    settings: Settings
    database_url: str
    supervisor: Supervisor
    writer: Writer
    sink: ChannelSink
    reads: ConnectionPool
    trade_writer: TradeWriter | None = None

    def status_json(self) -> dict[str, Any]:
        writer = self.writer.stats.as_json(queue_depth=self.sink.queue_depth)
        writer["accepted"] = self.sink.accepted
        writer["conflated"] = self.sink.conflated
        status = {
            "streams": {name: s.as_json() for name, s in self.supervisor.registry.items()},
            "writer": writer,
        }
        if self.trade_writer is not None:
            trades = self.trade_writer.stats.as_json()
            trades["accepted"] = self.sink.trades_accepted
            trades["dropped"] = self.sink.trades_dropped
            status["trades"] = trades
        return status

    def read_connection(self) -> contextlib.AbstractContextManager[psycopg.Connection]:
        """A pooled read connection; call it in a worker thread (it may block)."""
        return self.reads.connection()


def current_state() -> ServiceState:
    """The service behind the request being handled."""
    state: ServiceState = current_app.config["GREEKSD_STATE"]
    return state
