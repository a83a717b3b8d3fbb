"""API reads under a burst of concurrent GETs over a real socket, while rows are written:
reads are refused fast and visibly (503 + Retry-After), never stall the writer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import trio

from greeksd.service import RunningService
from tests.api_harness import serve_api
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
        assert body["error"] == "reads_busy", body
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
