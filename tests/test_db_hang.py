"""A database that hangs instead of refusing, with real parts: a dedicated embedded
PostgreSQL frozen with SIGSTOP, a table lock held by another session, and a service
started while its database is stopped. Every assertion about rows is on the database."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import trio
from psycopg import sql

from greeksd.backoff import Backoff
from greeksd.config import load_settings
from greeksd.model import StreamState, Trade
from greeksd.pipeline import Pipeline, open_pipeline
from greeksd.service import maintain_partitions, open_service
from greeksd.sim.market import SyntheticMarket, default_contracts
from greeksd.sim.synthetic import SyntheticSource
from greeksd.store.database import EmbeddedPostgres
from greeksd.store.deadline import DatabaseTimeout, Link, Watch, call_bounded, with_timeouts
from greeksd.store.migrations import discover, migrate
from greeksd.store.spool import Spool
from greeksd.store.trade_writer import TradeWriter
from tests.factories import make_snapshot
from tests.helpers import count_rows, fetch_rows, wait_until
from tests.test_trades_paths import trade

TIMEOUT_S = 1.0  # GREEKSD_DB_TIMEOUT_S for these tests: the client gives up after 2 s


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                # pid (comm) state ppid ...: comm may hold spaces, so split after ')'
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


@contextlib.contextmanager
def frozen(server: EmbeddedPostgres) -> Iterator[None]:
    """SIGSTOP the postmaster, then every backend and helper process; SIGCONT them all on
    the way out, whatever happened. The postmaster first, so it forks nothing new."""
    postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    stopped: list[int] = []
    try:
        os.kill(postmaster, signal.SIGSTOP)
        stopped.append(postmaster)
        for pid in _children(postmaster):
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


class Producer:
    """A steady live stream: `per_tick` rows every `every_s`, numbered by `seq`."""

    def __init__(self, pipeline: Pipeline, per_tick: int = 10, every_s: float = 0.02) -> None:
        self.pipeline = pipeline
        self.per_tick = per_tick
        self.every_s = every_s
        self.seq = 0
        self.max_queue_depth = 0

    def push(self, n: int) -> None:
        for _ in range(n):
            self.pipeline.sink.put(make_snapshot(self.seq))
            self.seq += 1

    async def run(self) -> None:
        while True:
            self.push(self.per_tick)
            self.max_queue_depth = max(self.max_queue_depth, self.pipeline.sink.queue_depth)
            await trio.sleep(self.every_s)


@contextlib.asynccontextmanager
async def steady_stream(
    url: str, tmp_path: Path
) -> AsyncIterator[tuple[Pipeline, Producer, trio.Nursery]]:
    """A spooling pipeline whose first 30 rows are committed, and a nursery to run the
    producer in once the fault is in place."""
    spool = Spool(tmp_path / "snapshots.spool", max_bytes=100 * 1024 * 1024)
    async with (
        open_pipeline(
            url, store_payload=True, flush_rows=50, flush_ms=20, spool=spool, db_timeout_s=TIMEOUT_S
        ) as pipeline,
        trio.open_nursery() as nursery,
    ):
        producer = Producer(pipeline)
        producer.push(30)
        await wait_until(
            lambda: pipeline.writer.stats.rows_written == 30, what="rows before the fault"
        )
        yield pipeline, producer, nursery


def _stored_once(url: str, expected: int) -> None:
    counts = fetch_rows(
        url, "SELECT (source_payload->>'seq')::int, count(*) FROM greek_snapshots GROUP BY 1"
    )
    assert sorted(seq for seq, _ in counts) == list(range(expected)), "every row stored"
    assert {n for _, n in counts} == {1}, "and none twice"


async def test_a_stuck_call_is_cut_off_and_its_thread_does_not_linger(
    own_server: EmbeddedPostgres,
) -> None:
    link = Link(psycopg.connect(own_server.url, autocommit=True))
    finished = threading.Event()

    def query(watch: Watch) -> None:
        try:
            watch.use(link).conn.execute("SELECT 1")
        finally:
            finished.set()

    with frozen(own_server):
        started = time.monotonic()
        try:
            await call_bounded(query, TIMEOUT_S, trio.CapacityLimiter(1))
        except DatabaseTimeout as exc:
            assert "not answering within 1 s" in str(exc)
        else:
            raise AssertionError("a call on a frozen server returned")
        waited = time.monotonic() - started
        # Still frozen: only the severed socket can have ended the thread's wait.
        await wait_until(finished.is_set, timeout=1.0, what="the worker thread to finish")
    assert TIMEOUT_S <= waited < TIMEOUT_S + 1.0
    assert link.conn.broken, "the connection was cut, not left waiting"
    link.close()


async def test_a_connect_that_times_out_before_the_deadline_is_a_database_timeout() -> None:
    """libpq's own connect_timeout can beat the deadline's timer (a loaded box runs the
    timer late): a server that accepts TCP and never answers the startup packet must
    still read as DatabaseTimeout, not as a raw psycopg error that callers do not treat
    as an outage. Here the deadline (30 s) is far behind libpq's 2 s on purpose."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        url = f"host=127.0.0.1 port={port} user=x dbname=x connect_timeout=2"

        def connect(watch: Watch) -> None:
            watch.open(psycopg.connect, url, None).close()

        started = time.monotonic()
        with trio.fail_after(10):
            try:
                await call_bounded(connect, 30.0, trio.CapacityLimiter(1))
            except DatabaseTimeout as exc:
                assert "not answering a connect" in str(exc)
            else:
                raise AssertionError("a connect to a silent server returned")
    assert time.monotonic() - started < 10


async def test_frozen_database_is_an_outage_rows_spool_then_land_once(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """SIGSTOP every server process under a steady stream: the writer notices within
    its deadline, spools every batch without waiting on the database again (the channel
    stays short, nothing conflates), and after SIGCONT stores every row exactly once."""
    url = own_server.url
    async with steady_stream(url, tmp_path) as (pipeline, producer, nursery):
        writer = pipeline.writer
        with frozen(own_server):
            frozen_at = time.monotonic()
            nursery.start_soon(producer.run)
            await wait_until(
                lambda: writer.stats.state is StreamState.DEGRADED, what="degraded", timeout=5
            )
            detected_s = time.monotonic() - frozen_at
            assert "not answering" in (writer.stats.last_error or "")
            # Rows that queued while the first call hung go to the spool; from then on
            # every batch goes straight there: the queue never again holds more than a
            # moment of rows, though the database still does not answer.
            await wait_until(lambda: pipeline.sink.queue_depth < 100, what="backlog spooled")
            backlog_spooled_s = time.monotonic() - frozen_at
            producer.max_queue_depth = 0
            spooled_before = writer.stats.spooled_rows
            await wait_until(
                lambda: writer.stats.failed_attempts >= 3, what="probes still failing", timeout=10
            )
            assert writer.stats.spooled_rows > spooled_before + 500
            # (A writer that waited for each retry's deadline would queue ~1000 here.)
            queued_while_frozen = producer.max_queue_depth
            assert queued_while_frozen < 500, queued_while_frozen
            assert writer.stats.rows_written == 30
        await wait_until(
            lambda: writer.stats.spool_bytes == 0, what="spool drained after SIGCONT", timeout=15
        )
        nursery.cancel_scope.cancel()
    print(
        f"\nfrozen: degraded after {detected_s:.2f} s, backlog spooled after"
        f" {backlog_spooled_s:.2f} s; spooled {writer.stats.spooled_rows} rows;"
        f" sent {producer.seq}; max queue after that {queued_while_frozen}"
    )
    assert detected_s < TIMEOUT_S + 2.0
    assert pipeline.sink.conflated == 0
    assert pipeline.sink.accepted == producer.seq
    _stored_once(url, producer.seq)


async def test_table_lock_times_out_rows_spool_then_land_once(db_url: str, tmp_path: Path) -> None:
    """Another session holds ACCESS EXCLUSIVE on the table: the server's statement
    timeout ends the writer's wait, batches spool, and after the lock is released every
    row is stored once."""
    async with steady_stream(db_url, tmp_path) as (pipeline, producer, nursery):
        writer = pipeline.writer
        with psycopg.connect(db_url) as locker:
            locker.execute("LOCK TABLE greek_snapshots IN ACCESS EXCLUSIVE MODE")
            locked_at = time.monotonic()
            nursery.start_soon(producer.run)
            await wait_until(
                lambda: writer.stats.state is StreamState.DEGRADED, what="degraded", timeout=5
            )
            detected_s = time.monotonic() - locked_at
            assert "statement timeout" in (writer.stats.last_error or "")
            await wait_until(
                lambda: writer.stats.spooled_rows > 300, what="rows spooled", timeout=10
            )
            locker.rollback()
        await wait_until(
            lambda: writer.stats.spool_bytes == 0, what="spool drained after release", timeout=15
        )
        nursery.cancel_scope.cancel()
    print(f"\nlocked: degraded after {detected_s:.2f} s; spooled {writer.stats.spooled_rows}")
    assert TIMEOUT_S <= detected_s < TIMEOUT_S + 1.0, "the server's timeout, not the client's"
    assert pipeline.sink.conflated == 0
    _stored_once(db_url, producer.seq)


async def test_writer_sends_nothing_until_the_schema_is_ready(
    empty_db_url: str, tmp_path: Path
) -> None:
    """A reachable database without the table: a leftover spool and new rows wait in the
    spool (no COPY is even tried, so nothing is set aside as refused) until the schema
    is ready; then everything is stored once."""
    path = tmp_path / "snapshots.spool"
    Spool(path, max_bytes=10_000_000).append([make_snapshot(i) for i in range(5)])
    ready = trio.Event()
    spool = Spool(path, max_bytes=10_000_000)
    async with open_pipeline(
        empty_db_url, store_payload=True, flush_rows=5, flush_ms=20, spool=spool, schema_ready=ready
    ) as pipeline:
        writer, producer = pipeline.writer, Producer(pipeline)
        producer.seq = 5
        producer.push(15)
        await wait_until(lambda: writer.stats.spooled_rows == 15, what="new rows spooled")
        assert writer.stats.failed_attempts == 0 and writer.stats.rejected_rows == 0
        await trio.to_thread.run_sync(migrate, empty_db_url)
        ready.set()
        await wait_until(lambda: writer.stats.spool_bytes == 0, what="spool drained")
    assert writer.stats.rejected_rows == 0
    _stored_once(empty_db_url, 20)


async def test_partition_upkeep_on_a_frozen_database_gives_up_within_its_deadline(
    own_server: EmbeddedPostgres,
) -> None:
    url = with_timeouts(own_server.url, TIMEOUT_S)
    with frozen(own_server):
        started = time.monotonic()
        with trio.fail_after(TIMEOUT_S + 5), contextlib.suppress(DatabaseTimeout):
            await maintain_partitions(url, 1, 0, TIMEOUT_S, trio.CapacityLimiter(1))
            raise AssertionError("partition upkeep returned while the server was frozen")
        waited = time.monotonic() - started
    assert waited < TIMEOUT_S + 1.5
    await maintain_partitions(url, 1, 0, TIMEOUT_S, trio.CapacityLimiter(1))  # thawed: works


async def test_service_starts_with_its_database_down_and_catches_up(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """The service's database (an empty one, never migrated) is stopped at start: the
    service starts anyway, says it waits for the database, spools its source's rows;
    once the server is started it migrates, and every row lands once."""
    with psycopg.connect(own_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("late")))
    url = psycopg.conninfo.make_conninfo(own_server.url, dbname="late")
    await trio.to_thread.run_sync(own_server.stop)
    settings = load_settings(
        {
            "GREEKSD_DATABASE_URL": url,
            "GREEKSD_DATA_DIR": str(tmp_path),
            "GREEKSD_API_PORT": "0",
            "GREEKSD_BROKERS": "",
            "GREEKSD_FLUSH_MS": "20",
            "GREEKSD_DB_TIMEOUT_S": str(TIMEOUT_S),
        },
        dotenv_path=tmp_path / "none.env",
    )
    today = datetime.now(UTC).date()
    source = SyntheticSource(
        SyntheticMarket(default_contracts(today), as_of=today), ticks_per_second=200
    )
    async with (
        open_service(settings, [source]) as service,
        httpx.AsyncClient(base_url=service.api_url) as http,
    ):
        writer = service.state.writer
        status = (await http.get("/v1/streaming/status")).json()["writer"]
        assert status["state"] == "degraded"
        assert status["last_error"].startswith("waiting for database: OperationalError")
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["error"] == "writer_degraded"
        assert "waiting for database" in health.json()["detail"]
        await wait_until(lambda: writer.stats.spooled_rows > 100, what="rows spooled")

        await trio.to_thread.run_sync(own_server.start)
        await wait_until(
            lambda: writer.stats.rows_written > 0 and writer.stats.spool_bytes == 0,
            what="migrated and drained",
            timeout=20,
        )
        assert (await http.get("/healthz")).status_code == 200
        service.stop()
    accepted = service.state.sink.accepted
    assert accepted == source.ticks_sent > 100
    assert writer.stats.spooled_rows > 100
    assert count_rows(url) == accepted
    versions = {v for (v,) in fetch_rows(url, "SELECT version FROM schema_migrations")}
    assert versions == {m.version for m in discover()}


async def test_trade_writer_treats_a_frozen_database_as_an_outage_and_loses_no_trade(
    own_server: EmbeddedPostgres,
) -> None:
    writer = TradeWriter(
        own_server.url, timeout_s=TIMEOUT_S, backoff=Backoff(initial=0.05, maximum=0.2)
    )
    send, receive = trio.open_memory_channel[Trade](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        async with send:
            await send.send(trade("before", Decimal(1)))
            await writer.wait_settled(1)
            with frozen(own_server):
                await send.send(trade("frozen", Decimal(2)))
                await wait_until(
                    lambda: writer.stats.state is StreamState.DEGRADED,
                    timeout=4 * TIMEOUT_S + 2,
                    what="the trade writer to notice the hang",
                )
                assert "not answering" in (writer.stats.last_error or "")
            await writer.wait_settled(2)
    assert writer.stats.state is StreamState.CONNECTED
    assert (writer.stats.written, writer.stats.rejected) == (2, 0)
    stored = fetch_rows(own_server.url, "SELECT broker_trade_id FROM trades ORDER BY 1")
    assert stored == [("before",), ("frozen",)]


async def test_trade_writer_sends_nothing_until_the_schema_is_ready(empty_db_url: str) -> None:
    schema_ready = trio.Event()
    writer = TradeWriter(empty_db_url, timeout_s=TIMEOUT_S, schema_ready=schema_ready)
    send, receive = trio.open_memory_channel[Trade](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        async with send:
            await send.send(trade("early", Decimal(1)))
            await wait_until(
                lambda: writer.stats.received == 1, timeout=2.0, what="the trade to arrive"
            )
            # With no `trades` table yet, an attempt would be refused and set aside.
            assert (writer.stats.failed_attempts, writer.stats.rejected) == (0, 0)
            await trio.to_thread.run_sync(migrate, empty_db_url)
            schema_ready.set()
            await writer.wait_settled(1)
    assert (writer.stats.written, writer.stats.rejected) == (1, 0)
    assert fetch_rows(empty_db_url, "SELECT broker_trade_id FROM trades") == [("early",)]
