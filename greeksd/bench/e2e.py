"""Benchmark: end-to-end latency, simulator socket => streams => pipeline => commit.

The simulators run here; the service side (both real streams + the real pipeline) runs in
`e2e_worker`, another process, so the two do not share a GIL on a 2-core box. Ticks are
offered in bursts, every 10 ms, half per broker, for `duration_s`.

Latency per row = persisted_at - send time. IBKR rows: the simulator stamps `_updated`
from the wall clock as it queues the frame, and that is the row's event_time (ms
resolution). DXLink rows: the simulator keeps each event's `time` strictly increasing
(+1 ms per event), which runs ahead of the clock at high rates, so the send wall time of
each (contract, time) is noted here just before its frame is published.
Rows lost = events the simulators sent - rows in the table after a settle period.
Events the IBKR simulator could not even queue for its socket (its outbox full: the
simulator process, not greeksd, is the limit) are not "sent": reported as sim_dropped.
`received` = market-data frames the streams read, so sent - received is lost before
greeksd and received - stored inside it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import trio

from greeksd.bench.pipeline import truncate
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.readiness import wait_subscribed
from greeksd.sim.tastytrade_api import TastytradeSim, open_tastytrade_sim

BOOK_SIZE = 50
BURST_S = 0.01
SETTLE_QUIET_S = 3.0


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _offer(
    ib_sim: IbkrGatewaySim, tt_sim: TastytradeSim, rate: float, duration_s: float
) -> tuple[float, dict[tuple[str, int], float]]:
    """Offer `rate` ticks/s (half per broker) in 10 ms bursts. Returns the elapsed time
    and the DXLink send wall time (s) per (contract key, event time ms)."""
    per_broker = rate / 2
    sent_at: dict[tuple[str, int], float] = {}
    started = trio.current_time()
    sent = 0
    wakeup = started
    while (now := trio.current_time()) - started < duration_s:
        burst = int(per_broker * (now - started)) + 1 - sent
        if burst > 0:
            for _ in range(burst):
                ib_sim.tick()
            ticks = [tt_sim.market.next_tick() for _ in range(burst)]
            before = len(tt_sim.sent_events)
            wall = time.time()
            await tt_sim.dxlink.publish(ticks)
            for event in tt_sim.sent_events[before:]:
                sent_at[(event.contract_key, event.time_ms)] = wall
            sent += burst
        wakeup += BURST_S
        await trio.sleep_until(wakeup)
    return trio.current_time() - started, sent_at


def _count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM greek_snapshots").fetchone()
        return int(row[0]) if row else 0


async def _settle(url: str, expected: int) -> None:
    """Until every sent event is stored, or nothing new arrived for a while."""
    last, quiet_since = -1, trio.current_time()
    while True:
        count = await trio.to_thread.run_sync(_count, url)
        now = trio.current_time()
        if count >= expected or (count == last and now - quiet_since > SETTLE_QUIET_S):
            return
        if count != last:
            last, quiet_since = count, now
        await trio.sleep(0.2)


def _latencies(url: str, dx_sent_at: dict[tuple[str, int], float]) -> dict[str, list[float]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT broker, contract_key, (extract(epoch FROM event_time) * 1000)::bigint, "
            "extract(epoch FROM persisted_at)::float8 FROM greek_snapshots"
        ).fetchall()
    out: dict[str, list[float]] = {"ibkr": [], "tastytrade": []}
    for broker, key, event_ms, persisted in rows:
        if broker == "ibkr":
            out[broker].append((persisted - event_ms / 1000) * 1000)
        else:
            sent = dx_sent_at.get((key, event_ms))
            if sent is not None:
                out[broker].append((persisted - sent) * 1000)
    return out


async def measure(
    url: str, rate: float, duration_s: float, flush_rows: int, flush_ms: int
) -> dict[str, Any]:
    await trio.to_thread.run_sync(truncate, url)
    book = default_contracts(datetime.now(UTC).date(), BOOK_SIZE)
    symbols = {dx.streamer_symbol(c.key) for c in book}
    async with (
        open_ibkr_sim(book, tick_interval=None, heartbeat_s=3600.0) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=3600.0, nan_rho_rate=0.0) as tt_sim,
    ):
        config = {
            "db_url": url,
            "flush_rows": flush_rows,
            "flush_ms": flush_ms,
            "ibkr_url": ib_sim.url,
            "tt_secret": tt_sim.secret,
            "tt_refresh": tt_sim.refresh_token,
            "tt_api_url": tt_sim.api_url,
        }
        command = [sys.executable, "-m", "greeksd.bench.e2e_worker", orjson.dumps(config).decode()]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert process.stdin is not None and process.stdout is not None
            with trio.fail_after(60.0):
                await wait_subscribed(ib_sim, tt_sim, ib_sim.conids.values(), symbols)
            elapsed, dx_sent_at = await _offer(ib_sim, tt_sim, rate, duration_s)
            sent = {
                "ibkr": sum(1 for t in ib_sim.sent_ticks if t.key is not None),
                "tastytrade": len(tt_sim.sent_events),
            }
            dropped = ib_sim.dropped_ticks  # the sim's own socket could not keep up
            await _settle(url, sum(sent.values()))
            await process.stdin.aclose()
            output = b""
            while chunk := await process.stdout.receive_some():
                output += chunk
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    worker = orjson.loads(output.splitlines()[-1]) if output.strip() else {}
    latencies = await trio.to_thread.run_sync(_latencies, url, dx_sent_at)
    stored = await trio.to_thread.run_sync(_count, url)
    everything = sorted(v for values in latencies.values() for v in values)
    achieved = sum(sent.values()) / elapsed
    result: dict[str, Any] = {
        "offered_per_s": rate,
        "achieved_per_s": round(achieved),
        "sim_dropped": dropped,
        "flush": f"{flush_rows}/{flush_ms}",
        "sent": sum(sent.values()),
        "received": sum(worker.get("ticks", {}).values()),
        "stored": stored,
        "lost": sum(sent.values()) - stored,
    }
    for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms"), (1.0, "max_ms")):
        value = _percentile(everything, q)
        result[name] = None if value is None else round(value, 1)
    result["peak_rss_mb"] = worker.get("peak_rss_mb")
    result["by_broker"] = {
        broker: {
            "sent": sent[broker],
            "p95_ms": _round(_percentile(sorted(values), 0.95)),
            "p99_ms": _round(_percentile(sorted(values), 0.99)),
        }
        for broker, values in latencies.items()
    }
    result["worker"] = worker
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


SEED_FLUSH = (50, 1000)  # the seed's rows / ms
LOW_LATENCY_FLUSH = (1000, 25)  # what p99 < 50 ms at low rates needs (flush wait <= 25 ms)


def run(
    url: str, rates: list[float], duration_s: float, flush_compare: list[float]
) -> list[dict[str, Any]]:
    """Each rate at 1000 rows / 100 ms; the `flush_compare` rates also at the seed's
    50 / 1000 and at 1000 / 25, so the flush defaults can be chosen from data."""
    runs = [(rate, 1000, 100) for rate in rates] + [
        (rate, *flush) for flush in (SEED_FLUSH, LOW_LATENCY_FLUSH) for rate in flush_compare
    ]
    return [trio.run(measure, url, rate, duration_s, rows, ms) for rate, rows, ms in runs]
