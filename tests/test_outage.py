"""Database outages with real parts: a dedicated embedded PostgreSQL is stopped for 30 s
under live simulated streams, and a service is killed with -9 while its spool holds rows.
Every assertion is on rows in the database."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.model import StreamStatus
from greeksd.pipeline import open_pipeline
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from greeksd.store.database import EmbeddedPostgres
from greeksd.store.spool import Spool
from tests.helpers import fetch_rows, wait_until

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
OUTAGE_S = 30.0


async def test_thirty_second_outage_loses_and_doubles_nothing(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = own_server.url
    book = default_contracts(datetime.now(UTC).date(), 4)
    ibkr_status, tt_status = StreamStatus("ibkr"), StreamStatus("tastytrade")
    spool = Spool(tmp_path / "snapshots.spool", max_bytes=100 * 1024 * 1024)
    async with (
        open_ibkr_sim(book, tick_interval=0.05) as ibkr_sim,
        open_tastytrade_sim(contracts=book, tick_interval=0.05) as tt_sim,
        open_pipeline(
            url, store_payload=True, flush_rows=20, flush_ms=100, spool=spool
        ) as pipeline,
        trio.open_nursery() as nursery,
    ):
        ibkr = IbkrStream(ibkr_sim.url, rest_min_interval=0.0)
        api = TastytradeApi(tt_sim.secret, tt_sim.refresh_token, api_url=tt_sim.api_url)
        tt = TastytradeStream(api, backoff=Backoff(initial=0.05, maximum=0.5))
        nursery.start_soon(ibkr.run, pipeline.sink, ibkr_status)
        nursery.start_soon(tt.run, pipeline.sink, tt_status)
        writer = pipeline.writer
        await wait_until(lambda: writer.stats.rows_written > 50, what="rows before the outage")

        await trio.to_thread.run_sync(own_server.stop)
        await wait_until(lambda: writer.stats.spool_bytes > 0, what="batches spooled")
        assert writer.stats.state.value == "degraded"
        await trio.sleep(OUTAGE_S)  # the outage itself, not a synchronisation
        ticks_during = ibkr_status.ticks + tt_status.ticks
        await trio.to_thread.run_sync(own_server.start)

        await wait_until(lambda: writer.stats.spool_bytes == 0, timeout=30, what="spool drained")
        await wait_until(
            lambda: ibkr_status.ticks + tt_status.ticks > ticks_during + 50,
            what="streams still flowing after the outage",
        )
        nursery.cancel_scope.cancel()
    assert writer.stats.spooled_rows > 100
    accepted = pipeline.sink.accepted
    assert accepted == ibkr_status.ticks + tt_status.ticks
    by_broker = dict(fetch_rows(url, "SELECT broker, count(*) FROM greek_snapshots GROUP BY 1"))
    assert by_broker == {"ibkr": ibkr_status.ticks, "tastytrade": tt_status.ticks}
    sent = {(e.contract_key, e.time_ms) for e in tt_sim.sent_events}
    stored = {
        (key, (t - EPOCH) // timedelta(milliseconds=1))
        for key, t in fetch_rows(
            url, "SELECT contract_key, event_time FROM greek_snapshots WHERE broker='tastytrade'"
        )
    }
    assert stored <= sent and len(stored) == tt_status.ticks, "exactly once, nothing invented"
    assert len(ibkr_sim.sent_ticks) >= ibkr_status.ticks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_service(url: str, data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEKSD_")}
    env.update(
        GREEKSD_DATABASE_URL=url,
        GREEKSD_DATA_DIR=str(data_dir),
        GREEKSD_API_PORT=str(port),
        GREEKSD_BROKERS="synthetic",
        GREEKSD_STORE_PAYLOAD="1",  # rows are told apart by their payload's seq
        GREEKSD_FLUSH_ROWS="20",
        GREEKSD_FLUSH_MS="100",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "greeksd.cli", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _status(port: int) -> dict | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/streaming/status", timeout=2).json()
    except httpx.TransportError:
        return None


def _poll(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_while_spooling_then_restart_loses_and_doubles_nothing(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    url, port = own_server.url, _free_port()
    spool_path = tmp_path / "spool" / "snapshots.spool"
    proc = _start_service(url, tmp_path, port)
    try:
        _poll(
            lambda: (_status(port) or {}).get("writer", {}).get("rows_written", 0) > 20,
            30,
            "rows written",
        )
        own_server.stop()
        _poll(
            lambda: (_status(port) or {}).get("writer", {}).get("spooled_rows", 0) > 100,
            30,
            "rows spooled",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    spooled = [s for batch in Spool(spool_path, max_bytes=1 << 30).batches() for s in batch]
    assert len(spooled) > 100
    own_server.start()

    proc = _start_service(url, tmp_path, port)
    try:
        _poll(
            lambda: (_status(port) or {}).get("writer", {}).get("rows_written", 0) > 0,
            30,
            "restarted service writing",
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert re.search(r"event=spool_drained rows=\d+", err)
    assert Spool(spool_path, max_bytes=1 << 30).size == 0
    seq_counts = dict(
        fetch_rows(
            url,
            "SELECT (source_payload->>'seq')::int, count(*) FROM greek_snapshots"
            " WHERE event_time = ANY(%s) GROUP BY 1",
            ([s.event_time for s in spooled],),
        )
    )
    assert len(seq_counts) == len(spooled), "every spooled row is in the database"
    assert set(seq_counts.values()) == {1}, "and none twice"
