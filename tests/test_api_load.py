"""Admission under load: a burst of concurrent GETs over a real socket while rows are
written is answered fast and visibly (200, or 503 + Retry-After), never stalls the
writer; a saturated gate or read pool refuses at once, and /healthz is never gated."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from greeksd.api.state import HTTP_GATE_SIZE, READ_STATEMENT_TIMEOUT_S
from greeksd.bench import api_reads
from greeksd.service import RunningService
from tests.api_harness import open_api, serve_api
from tests.factories import make_snapshot
from tests.helpers import fetch_rows

BURST = 200
PATHS = (
    "/v1/greeks/snapshots?limit=500",
    "/v1/greeks/latest",
    "/v1/risk/timeline?start=2026-11-25T15:00Z&end=2026-11-25T16:00Z",
    "/v1/trades",
)
# Normally a few tens of ms; when reads shared the writer's thread limiter it stalled for
# tens of seconds (requests parked on the pool's 5 s timeout held every worker thread).
WRITER_STALL_LIMIT = timedelta(seconds=3)


async def _feed(service: RunningService, counter: list[int]) -> None:
    """One new row every 5 ms, received 'now', until cancelled."""
    i = 10_000
    while True:
        service.state.sink.put(make_snapshot(i))
        counter[0] += 1
        i += 1
        await trio.sleep(0.005)


async def test_a_burst_of_reads_is_refused_fast_and_never_stalls_the_writer(
    db_url: str, tmp_path: Path
) -> None:
    async with serve_api(db_url, tmp_path) as service:
        for i in range(3000):
            service.state.sink.put(make_snapshot(i))
        await service.state.writer.wait_settled(3000)

        answers: list[tuple[int, dict[str, str], Any]] = []
        fed = [0]
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(
            base_url=service.api_url, timeout=60.0, limits=limits
        ) as client:

            async def get(i: int) -> None:
                response = await client.get(PATHS[i % len(PATHS)])
                body = response.json() if response.status_code >= 400 else None
                answers.append((response.status_code, dict(response.headers), body))

            burst_started = datetime.now(UTC)
            async with trio.open_nursery() as feeding:
                feeding.start_soon(_feed, service, fed)
                async with trio.open_nursery() as readers:
                    for i in range(BURST):
                        readers.start_soon(get, i)
                feeding.cancel_scope.cancel()
            burst_ended = datetime.now(UTC)
        await service.state.writer.wait_settled(service.state.sink.accepted)

    assert len(answers) == BURST
    statuses = sorted({status for status, _, _ in answers})
    assert set(statuses) <= {200, 503}, statuses
    refused = [(h, b) for status, h, b in answers if status == 503]
    for headers, body in refused:
        assert body["error"] in ("busy", "reads_busy"), body
        assert int(headers["retry-after"]) >= 1
    assert len(refused) < BURST, "some reads must be served"

    latencies = fetch_rows(
        db_url,
        "SELECT persisted_at - received_at FROM greek_snapshots"
        " WHERE received_at >= %s AND received_at < %s",
        (burst_started, burst_ended),
    )
    assert fed[0] > 0 and len(latencies) >= fed[0] - 1, "rows offered during the burst"
    worst = max(latency for (latency,) in latencies)
    assert worst < WRITER_STALL_LIMIT, f"writer stalled {worst} during the read burst"


async def test_a_full_gate_answers_busy_at_once_but_not_on_health_or_controls(
    db_url: str, tmp_path: Path
) -> None:
    async with open_api(db_url, tmp_path) as h:
        holders = [object() for _ in range(HTTP_GATE_SIZE)]
        for holder in holders:
            h.state.http_gate.acquire_on_behalf_of_nowait(holder)
        with trio.fail_after(1.0):  # "at once": the gate waits 0.25 s, never seconds
            response = await h.client.get("/v1/greeks/latest")
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        body = await response.get_json()
        assert body["error"] == "busy" and body["detail"]
        status, health = await h.get_json("/healthz")
        assert status == 200 and health["status"] == "ok"
        stopped = await h.client.post("/v1/streaming/stop")
        assert stopped.status_code == 200, "an operator can still act"
        assert h.state.reads.refusals.total["busy"] == 1
        for holder in holders:
            h.state.http_gate.release_on_behalf_of(holder)
        metrics = await h.client.get("/metrics")
        assert 'greeksd_api_refused_total{reason="busy"} 1' in await metrics.get_data(True)
        status, _ = await h.get_json("/v1/greeks/latest")
        assert status == 200


async def test_full_read_slots_answer_reads_busy_at_once(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        reads = h.state.reads
        holders = [object() for _ in range(reads.size)]
        for holder in holders:
            await reads.admit(holder)
        for path in PATHS:
            with trio.fail_after(1.0):
                response = await h.client.get(path)
            body = await response.get_json()
            assert response.status_code == 503, (path, body)
            assert body["error"] == "reads_busy" and response.headers["Retry-After"] == "1"
        for holder in holders:
            reads.release(holder)
        assert reads.refusals.total["reads_busy"] == len(PATHS)
        status, _ = await h.get_json("/v1/greeks/latest")
        assert status == 200


async def test_the_bench_case_measures_each_kind_of_reader(db_url: str) -> None:
    """`greeksd bench` section 5 at a tiny size: well-formed, every read answered 200 or
    503 with Retry-After (its speed is the benchmark's business)."""
    rows = await api_reads.measure(db_url, rate=200, duration_s=1.0, concurrency=20)
    assert [r["readers"] for r in rows] == ["none", "polite", "hammering"]
    for row in rows:
        assert row["rows"] > 0 and row["p99_ms"] is not None
        assert row["reads_other"] == 0, row["reads"]
    assert rows[1]["reads_ok"] + rows[1]["reads_503_retry_after"] > 0


async def test_read_connections_carry_a_statement_timeout(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        reads = h.state.reads
        async with reads.connection() as conn:
            row = await reads.run(lambda: conn.execute("SHOW statement_timeout").fetchone())
        assert row == (f"{READ_STATEMENT_TIMEOUT_S}s",)


async def test_a_query_over_the_statement_timeout_is_a_503_with_retry_after(
    db_url: str, tmp_path: Path
) -> None:
    async with open_api(db_url, tmp_path, read_statement_timeout_s=0.001) as h:
        await h.put([make_snapshot(i) for i in range(5000)])  # latest sorts them all: > 1 ms
        response = await h.client.get("/v1/greeks/latest")
        body = await response.get_json()
        assert (response.status_code, body["error"]) == (503, "query_timeout"), body
        assert response.headers["Retry-After"] == "1" and "narrow" in body["detail"]


async def test_http_answers_while_the_service_loop_is_blocked(db_url: str, tmp_path: Path) -> None:
    """The HTTP server runs its own loop (greeksd.api.loop): it answers even while the
    service's loop (writer, supervisor) does not turn at all. On a shared loop the
    request could not be served until the block ended."""
    async with serve_api(db_url, tmp_path) as service:
        asking, answered = threading.Event(), threading.Event()
        statuses: list[int] = []

        def ask() -> None:
            asking.set()
            statuses.append(httpx.get(f"{service.api_url}/healthz", timeout=10.0).status_code)
            answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, ask, abandon_on_cancel=False))
            await trio.to_thread.run_sync(asking.wait)
            # Block this loop (the service's) until the answer arrives, at most 5 s.
            served_while_blocked = answered.wait(timeout=5.0)
        assert served_while_blocked, "no answer while the service loop was blocked"
        assert statuses == [200]
