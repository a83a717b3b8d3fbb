"""What the HTTP layer may see of the running service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import trio
from psycopg_pool import ConnectionPool
from quart import current_app

from greeksd.api.loop import call_on_loop
from greeksd.archive import Archive
from greeksd.config import Settings
from greeksd.sink import ChannelSink
from greeksd.store.compaction import CompactionStats
from greeksd.store.reads import ReadPool, load_out_of_range_times_as_text
from greeksd.store.trade_writer import TradeWriter
from greeksd.store.writer import Writer
from greeksd.supervisor import Supervisor

# The API's own connections: reads (one per request, a streamed page at most) and the rare
# strategy-log insert. A small pool keeps them off the writer's connection without
# holding many server backends; admission in front of it (greeksd.store.reads.ReadPool)
# answers 503 at once when every connection is taken instead of queueing requests.
READ_POOL_MAX = 4
# How long a request waits for a free read slot before its 503 (Retry-After): long enough
# to absorb a short burst of fast reads, short enough that nobody queues for seconds.
READ_ADMIT_WAIT_S = 0.25
# How long a slot holder waits for a pooled connection (or for the server) before it gets
# a 503 instead of hanging: only a database that is down or unreachable takes this long.
READ_POOL_TIMEOUT_S = 5.0
# Server-side ceiling on every statement of a read connection, so one expensive query
# cannot hold a connection (and its slot) for long.
READ_STATEMENT_TIMEOUT_S = 10
# HTTP requests handled at once, and how long the next one waits for a turn before its 503
# `busy` (greeksd.api.app explains why the writer needs this bound).
HTTP_GATE_SIZE = 8
HTTP_GATE_WAIT_S = 0.25
T = TypeVar("T")

# Never gated: a liveness probe must not fail, and an operator must be able to stop or
# start a stream, because reads are busy. All three are cheap and do not touch the database.
UNGATED_PATHS = frozenset({"/healthz", "/v1/streaming/start", "/v1/streaming/stop"})


def _read_session(statement_timeout_ms: int) -> Callable[[psycopg.Connection], None]:
    def configure(conn: psycopg.Connection) -> None:
        """Times come back in UTC whatever the server's default zone; every statement is
        bounded server-side; out-of-range times load as text."""
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
        conn.commit()
        load_out_of_range_times_as_text(conn)

    return configure


@contextlib.asynccontextmanager
async def open_read_pool(
    url: str,
    *,
    wait_s: float = READ_POOL_TIMEOUT_S,
    size: int = READ_POOL_MAX,
    statement_timeout_s: float = READ_STATEMENT_TIMEOUT_S,
) -> AsyncIterator[ReadPool]:
    """The API's read connections, opened lazily (a database that is down at start-up
    makes requests fail with 503, not the service) and closed with the service."""
    pool: ConnectionPool = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        timeout=wait_s,
        kwargs={"connect_timeout": 5},
        check=ConnectionPool.check_connection,
        configure=_read_session(max(1, round(statement_timeout_s * 1000))),
        name="greeksd-reads",
    )
    reads = ReadPool(pool, size, READ_ADMIT_WAIT_S)
    await reads.run(lambda: pool.open(wait=False))
    try:
        yield reads
    finally:
        with trio.CancelScope(shield=True):
            await reads.run(lambda: pool.close(timeout=5.0))


@dataclass
class ServiceState:
    settings: Settings
    database_url: str
    supervisor: Supervisor
    writer: Writer
    sink: ChannelSink
    reads: ReadPool
    trade_writer: TradeWriter | None = None
    http_gate: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(HTTP_GATE_SIZE)
    )
    # The loop the service (supervisor, writer) runs on, when HTTP runs on its own loop
    # (greeksd.api.loop); None when both share one loop (the in-process test client).
    service_token: trio.lowlevel.TrioToken | None = None
    # The raw-frame archive (greeksd.archive); None when GREEKSD_ARCHIVE=0.
    archive: Archive | None = None
    # The partition keeper's index compaction (greeksd.store.compaction).
    compaction: CompactionStats = field(default_factory=CompactionStats)

    async def on_service_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the service's loop: needed to touch its trio objects (the
        supervisor's nursery and scopes), and to read state it mutates as one consistent
        snapshot rather than while it changes."""
        return await call_on_loop(self.service_token, fn, *args)

    def status_json(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        writer = self.writer.stats.as_json(queue_depth=self.sink.queue_depth)
        writer["accepted"] = self.sink.accepted
        writer["conflated"] = self.sink.conflated
        status: dict[str, Any] = {
            "instance": self.settings.instance,
            "streams": {name: s.as_json(now) for name, s in self.supervisor.registry.items()},
            "writer": writer,
        }
        if self.trade_writer is not None:
            trades = self.trade_writer.stats.as_json()
            trades["accepted"] = self.sink.trades_accepted
            trades["dropped"] = self.sink.trades_dropped
            status["trades"] = trades
        status["archive"] = (
            self.archive.stats.as_json(self.archive.pending)
            if self.archive is not None
            else {"state": "off"}
        )
        status["partitions"] = self.compaction.as_json()
        return status


def current_state() -> ServiceState:
    """The service behind the request being handled."""
    state: ServiceState = current_app.config["GREEKSD_STATE"]
    return state
