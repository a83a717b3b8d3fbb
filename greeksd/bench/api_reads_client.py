"""The reading side of the API-reads benchmark, in its own process (its own GIL).

    python -m greeksd.bench.api_reads_client '<json config>'

Keeps `concurrency` keep-alive connections each sending GETs back to back for
`duration_s`; with `polite` a client waits the Retry-After of a 503 before its next GET
(what a well-behaved client does), without it retries at once (the worst case). A
minimal h11 client, so that the client process is not the bottleneck (httpx managed
~70 requests/s at this concurrency here). Prints one JSON line: when it ran (epoch s),
answers counted by status and error code, client-side latency percentiles.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import h11
import orjson
import trio

PATHS = (
    "/v1/greeks/snapshots?limit=200",
    "/v1/greeks/latest",
    "/v1/trades?limit=100",
)


async def _get(
    stream: trio.SocketStream, conn: h11.Connection, host: str, path: str
) -> tuple[int, dict[bytes, bytes], bytes]:
    request = h11.Request(method="GET", target=path, headers=[("Host", host)])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("closed mid-response")


async def hammer(
    base_url: str, concurrency: int, duration_s: float, polite: bool
) -> dict[str, Any]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    answers: Counter[str] = Counter()
    latencies: list[float] = []
    started_at = time.time()
    deadline = trio.current_time() + duration_s

    async def reader(index: int) -> None:
        n = index
        stream, conn = await trio.open_tcp_stream(host, int(port)), h11.Connection(h11.CLIENT)
        while trio.current_time() < deadline:
            path = PATHS[n % len(PATHS)]
            n += 1
            began = time.perf_counter()
            status, headers, body = await _get(stream, conn, host, path)
            latencies.append(time.perf_counter() - began)
            key = str(status)
            retry_after = headers.get(b"retry-after")
            if status >= 500:
                key += f" {orjson.loads(body).get('error', '?')}"
                key += " (Retry-After)" if retry_after else ""
            answers[key] += 1
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                await stream.aclose()
                stream, conn = (
                    await trio.open_tcp_stream(host, int(port)),
                    h11.Connection(h11.CLIENT),
                )
            else:
                conn.start_next_cycle()
            if polite and retry_after:
                await trio.sleep(float(retry_after))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(reader, i)
    ended_at = time.time()
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {
        "started_at": started_at,
        "ended_at": ended_at,
        "requests": sum(answers.values()),
        "answers": dict(answers),
        "client_p50_ms": pct(0.5),
        "client_p99_ms": pct(0.99),
    }


def main() -> None:
    config = orjson.loads(sys.argv[1])
    result = trio.run(
        hammer, config["base_url"], config["concurrency"], config["duration_s"], config["polite"]
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
