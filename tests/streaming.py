"""Run real broker streams against simulators into a real pipeline until a condition holds:
the set-up many end-to-end tests share (fast backoff, no REST pacing)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.model import StreamStatus
from greeksd.pipeline import open_pipeline
from greeksd.sim.ibkr_gateway import IbkrGatewaySim
from greeksd.sim.tastytrade_api import TastytradeSim
from tests.helpers import wait_until

FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)


def ibkr_stream(sim: IbkrGatewaySim) -> IbkrStream:
    return IbkrStream(sim.url, rest_min_interval=0.0, backoff=FAST_BACKOFF)


def tastytrade_stream(sim: TastytradeSim) -> TastytradeStream:
    api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
    return TastytradeStream(api, backoff=FAST_BACKOFF)


async def stream_until(
    db_url: str,
    streams: Sequence[tuple[IbkrStream | TastytradeStream, StreamStatus]],
    done: Callable[[], bool | Awaitable[bool]],
    *,
    what: str,
    timeout: float = 10.0,  # noqa: ASYNC109 - passed on to wait_until's wall clock
    flush_rows: int = 50,
    flush_ms: int = 100,
) -> None:
    """Run `streams` into a pipeline on `db_url` until `done()`; then stop them and flush
    (leaving the pipeline writes every accepted row)."""
    async with (
        open_pipeline(db_url, flush_rows=flush_rows, flush_ms=flush_ms) as pipeline,
        trio.open_nursery() as nursery,
    ):
        for stream, status in streams:
            nursery.start_soon(stream.run, pipeline.sink, status)
        await wait_until(done, timeout=timeout, what=what)
        nursery.cancel_scope.cancel()
