"""Benchmark: does reading through the API slow the writer down?

The real service (`open_service`: read pool, pipeline, HTTP on a socket) gets synthetic
snapshots at a steady rate straight into its sink, first with nobody reading, then while
another process (`api_reads_client`, its own GIL) keeps `concurrency` connections
reading: "polite" clients wait the Retry-After of a 503, "hammering" ones retry at once.
Writer latency per row = persisted_at - received_at, read back from the table for the
rows offered during each phase; the target is writer p99 under load within 2x of the
quiet p99. The reads' answers are counted by status (503s must carry Retry-After).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio

from greeksd.bench.pipeline import truncate
from greeksd.bench.writer_paths import synthetic_rows
from greeksd.config import load_settings
from greeksd.service import RunningService, open_service

TICK_S = 0.01
RATE = 500  # rows/s offered to the writer
CONCURRENCY = 200  # GETs kept in flight in the loaded phase


def _writer_latency(url: str, since: datetime, until: datetime) -> dict[str, Any]:
    query = (
        "SELECT count(*),"
        " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms), max(ms)"
        " FROM (SELECT extract(epoch FROM persisted_at - received_at) * 1000 AS ms"
        "       FROM greek_snapshots WHERE received_at >= %s AND received_at < %s) t"
    )
    with psycopg.connect(url) as conn:
        row = conn.execute(query, (since, until)).fetchone()
    assert row is not None
    count, (p50, p95, p99), worst = row[0], row[1] or (None, None, None), row[2]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(float(value), 1)

    return {
        "rows": count,
        "p50_ms": ms(p50),
        "p95_ms": ms(p95),
        "p99_ms": ms(p99),
        "max_ms": ms(worst),
    }


async def _offer(service: RunningService, rate: float) -> None:
    """`rate` rows/s into the sink in 10 ms ticks, each row received 'now', until
    cancelled."""
    started = trio.current_time()
    sent = 0
    while True:
        due = int(rate * (trio.current_time() - started)) + 1 - sent
        if due > 0:
            for snapshot in synthetic_rows(due, offset=sent):
                service.state.sink.put(snapshot)
            sent += due
        await trio.sleep(TICK_S)


async def _readers(
    base_url: str, concurrency: int, duration_s: float, polite: bool
) -> dict[str, Any]:
    config = {
        "base_url": base_url,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "polite": polite,
    }
    command = [
        sys.executable,
        "-m",
        "greeksd.bench.api_reads_client",
        orjson.dumps(config).decode(),
    ]
    result = await trio.run_process(command, capture_stdout=True, stderr=subprocess.DEVNULL)
    return dict(orjson.loads(result.stdout.splitlines()[-1]))


CLIENTS = {"none": None, "polite": True, "hammering": False}


async def _phase(
    url: str,
    service: RunningService,
    rate: float,
    duration_s: float,
    concurrency: int,
    clients: str,
) -> dict[str, Any]:
    """Rows offered throughout; the measured window is the readers' run (or `duration_s`
    of quiet)."""
    polite = CLIENTS[clients]
    readers = 0 if polite is None else concurrency
    row: dict[str, Any] = {"concurrent_reads": readers, "readers": clients, "rows_per_s": rate}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_offer, service, rate)
        if polite is None:
            since = datetime.now(UTC)
            await trio.sleep(duration_s)
            until = datetime.now(UTC)
            reads: dict[str, Any] = {"requests": 0, "answers": {}, "client_p50_ms": None}
        else:
            reads = await _readers(service.api_url, readers, duration_s, polite)
            since = datetime.fromtimestamp(reads["started_at"], UTC)
            until = datetime.fromtimestamp(reads["ended_at"], UTC)
        nursery.cancel_scope.cancel()
    await service.state.writer.wait_settled(service.state.sink.accepted)
    row.update(await trio.to_thread.run_sync(_writer_latency, url, since, until))
    answers: dict[str, int] = reads["answers"]
    ok = answers.get("200", 0)
    retry = sum(n for k, n in answers.items() if k.startswith("503") and "Retry-After" in k)
    row.update(
        reads_per_s=round(reads["requests"] / duration_s),
        reads_ok=ok,
        reads_503_retry_after=retry,
        reads_other=reads["requests"] - ok - retry,
        client_p50_ms=reads["client_p50_ms"],
        reads=reads,
    )
    return row


async def measure(
    url: str, rate: float, duration_s: float, concurrency: int
) -> list[dict[str, Any]]:
    await trio.to_thread.run_sync(truncate, url)
    with tempfile.TemporaryDirectory(prefix="greeksd-bench-api-") as data_dir:
        settings = load_settings(
            {"GREEKSD_DATABASE_URL": url, "GREEKSD_DATA_DIR": data_dir, "GREEKSD_API_PORT": "0"},
            dotenv_path=Path(data_dir) / "none.env",
        )
        results = []
        async with open_service(settings, []) as service:
            for clients in CLIENTS:
                results.append(await _phase(url, service, rate, duration_s, concurrency, clients))
    quiet = results[0]["p99_ms"]
    for row in results:
        row["p99_vs_quiet_x"] = round(row["p99_ms"] / quiet, 2) if quiet and row["p99_ms"] else None
    return results


def run(
    url: str, duration_s: float = 10.0, rate: float = RATE, concurrency: int = CONCURRENCY
) -> list[dict[str, Any]]:
    return trio.run(measure, url, rate, duration_s, concurrency)
