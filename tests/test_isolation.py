"""SC-004: one broker dropping and stalling never delays the other broker's rows.
Measured on the rows in the database: the largest gap between consecutive received_at
of the healthy broker while the other one is being broken on purpose."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.pipeline import open_pipeline
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import TastytradeSim, open_tastytrade_sim
from greeksd.supervisor import Supervisor
from tests.helpers import fetch_rows, wait_until

ABUSE_S = 8.0
MAX_GAP_S = 1.0


def _largest_gap(db_url: str, broker: str, since: datetime) -> float:
    times = [
        r[0]
        for r in fetch_rows(
            db_url,
            "SELECT received_at FROM greek_snapshots WHERE broker = %s AND received_at >= %s"
            " ORDER BY received_at",
            (broker, since),
        )
    ]
    assert len(times) > 20, f"too few {broker} rows to judge: {len(times)}"
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


async def _abuse_ibkr(sim: IbkrGatewaySim) -> None:
    for _ in range(int(ABUSE_S / 2)):
        sim.drop_connections()
        await trio.sleep(1.0)
        sim.stall()
        await trio.sleep(1.0)
        sim.restore()


async def _abuse_tastytrade(sim: TastytradeSim) -> None:
    for _ in range(int(ABUSE_S / 2)):
        await sim.drop()
        await trio.sleep(1.0)
        sim.stall(True)
        await trio.sleep(1.0)
        sim.stall(False)


async def _run_with_abuse(
    db_url: str, abuse: Callable[[IbkrGatewaySim, TastytradeSim], Awaitable[None]]
) -> tuple[datetime, Supervisor]:
    book = default_contracts(datetime.now(UTC).date(), 6)
    async with (
        open_ibkr_sim(book, tick_interval=0.02) as ibkr_sim,
        open_tastytrade_sim(contracts=book, tick_interval=0.02) as tt_sim,
        open_pipeline(db_url, flush_rows=10, flush_ms=50) as pipeline,
        trio.open_nursery() as nursery,
    ):
        supervisor = Supervisor(
            pipeline.sink, backoff_factory=lambda: Backoff(initial=0.05, maximum=0.5)
        )
        supervisor.add(
            IbkrStream(
                ibkr_sim.url,
                rest_min_interval=0.0,
                watchdog_s=0.5,
                backoff=Backoff(initial=0.05, maximum=0.3),
            )
        )
        api = TastytradeApi(tt_sim.secret, tt_sim.refresh_token, api_url=tt_sim.api_url)
        supervisor.add(
            TastytradeStream(api, keepalive_timeout=0.5, backoff=Backoff(initial=0.05, maximum=0.3))
        )
        await nursery.start(supervisor.run)
        await wait_until(
            lambda: all(s.ticks > 20 for s in supervisor.registry.values()),
            what="both brokers streaming",
        )
        since = datetime.now(UTC)
        await abuse(ibkr_sim, tt_sim)
        nursery.cancel_scope.cancel()
    return since, supervisor


async def test_ibkr_dropping_and_stalling_never_delays_tastytrade(db_url: str) -> None:
    since, supervisor = await _run_with_abuse(db_url, lambda ibkr, _: _abuse_ibkr(ibkr))
    assert supervisor.registry["ibkr"].reconnects >= 2, "the abuse really broke IBKR"
    assert _largest_gap(db_url, "tastytrade", since) < MAX_GAP_S


async def test_tastytrade_dropping_and_stalling_never_delays_ibkr(db_url: str) -> None:
    since, supervisor = await _run_with_abuse(db_url, lambda _, tt: _abuse_tastytrade(tt))
    assert supervisor.registry["tastytrade"].reconnects >= 2, "the abuse really broke it"
    assert _largest_gap(db_url, "ibkr", since) < MAX_GAP_S
