"""Benchmark: end-to-end latency, simulator socket => streams => pipeline => commit.

The simulators of every broker with a benchmark entry (greeksd.brokers.spec.BenchEntry)
run here; the service side (the real streams, built by their specs exactly as `greeksd
run` builds them, + the real pipeline) runs in `e2e_worker`, another process, so the two
do not share a GIL on a 2-core box. Ticks are offered in bursts, every 10 ms, split
evenly over the brokers, for `duration_s`.

Latency per row = persisted_at - send time, as each simulator knows it (greeksd.bench.sims).
Rows lost = events the simulators sent - rows in the table after a settle period.
Events a simulator could not even queue for its socket (its outbox full: the simulator
process, not greeksd, is the limit) are not "sent": reported as sim_dropped.
`received` = market-data frames the streams read, so sent - received is lost before
greeksd and received - stored inside it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import trio

from greeksd.bench.pipeline import truncate
from greeksd.brokers import registry
from greeksd.brokers.spec import BenchSim
from greeksd.settings_table import read_table, table_env
from greeksd.sim.market import default_contracts
from greeksd.sim.readiness import wait_subscribed

BOOK_SIZE = 50
BURST_S = 0.01
SETTLE_QUIET_S = 3.0


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def offer(sims: Mapping[str, BenchSim[Any]], rate: float, duration_s: float) -> float:
    """Offer `rate` ticks/s (split evenly over the brokers) in 10 ms bursts. Returns the
    elapsed time."""
    per_broker = rate / len(sims)
    started = trio.current_time()
    sent = 0
    wakeup = started
    while (now := trio.current_time()) - started < duration_s:
        burst = int(per_broker * (now - started)) + 1 - sent
        if burst > 0:
            for sim in sims.values():
                await sim.offer(burst)
            sent += burst
        wakeup += BURST_S
        await trio.sleep_until(wakeup)
    return trio.current_time() - started


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


def _latencies(url: str, sims: Mapping[str, BenchSim[Any]]) -> dict[str, list[float]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT broker, contract_key, (extract(epoch FROM event_time) * 1000)::bigint, "
            "extract(epoch FROM persisted_at)::float8 FROM greek_snapshots"
        ).fetchall()
    out: dict[str, list[float]] = {name: [] for name in sims}
    for broker, key, event_ms, persisted in rows:
        latency = sims[broker].latency_ms(key, event_ms, persisted)
        if latency is not None:
            out[broker].append(latency)
    return out


async def measure(
    url: str, rate: float, duration_s: float, flush_rows: int, flush_ms: int
) -> dict[str, Any]:
    await trio.to_thread.run_sync(truncate, url)
    book = default_contracts(datetime.now(UTC).date(), BOOK_SIZE)
    async with AsyncExitStack() as stack:
        sims: dict[str, BenchSim[Any]] = {}
        env: dict[str, str] = {}
        for spec in registry.specs():
            if spec.bench is not None:
                defaults = read_table(spec.settings, {}, spec.prefix)
                sim = await stack.enter_async_context(spec.bench.e2e(book, defaults))
                sims[spec.name] = sim
                env |= table_env(sim.settings, spec.prefix)
        config = {
            "db_url": url,
            "flush_rows": flush_rows,
            "flush_ms": flush_ms,
            "brokers": list(sims),
            "env": env,
        }
        command = [sys.executable, "-m", "greeksd.bench.e2e_worker", orjson.dumps(config).decode()]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert process.stdin is not None and process.stdout is not None
            with trio.fail_after(60.0):
                await wait_subscribed(list(sims.values()), [c.key for c in book])
            elapsed = await offer(sims, rate, duration_s)
            sent = {name: sim.sent() for name, sim in sims.items()}
            dropped = sum(sim.dropped() for sim in sims.values())
            await _settle(url, sum(sent.values()))
            await process.stdin.aclose()
            output = b""
            while chunk := await process.stdout.receive_some():
                output += chunk
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
        latencies = await trio.to_thread.run_sync(_latencies, url, sims)
    worker = orjson.loads(output.splitlines()[-1]) if output.strip() else {}
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
        value = percentile(everything, q)
        result[name] = None if value is None else round(value, 1)
    result["peak_rss_mb"] = worker.get("peak_rss_mb")
    result["by_broker"] = {
        broker: {
            "sent": sent[broker],
            "p95_ms": _round(percentile(sorted(values), 0.95)),
            "p99_ms": _round(percentile(sorted(values), 0.99)),
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
