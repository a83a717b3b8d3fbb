"""Supervisor: failing sources restart in their own scope; others keep writing."""

from __future__ import annotations

from datetime import date

import trio

from greeksd.backoff import Backoff
from greeksd.model import StreamState
from greeksd.pipeline import open_pipeline
from greeksd.sim.market import SyntheticMarket, default_contracts
from greeksd.sim.synthetic import SyntheticSource
from greeksd.supervisor import Supervisor
from tests.helpers import fetch_rows, wait_until


def _market(seed: int) -> SyntheticMarket:
    return SyntheticMarket(
        default_contracts(date(2026, 11, 25), 4), as_of=date(2026, 11, 25), seed=seed
    )


def _rows_by_source(db_url: str) -> dict[str, int]:
    return dict(
        fetch_rows(
            db_url, "SELECT source_payload->>'source', count(*) FROM greek_snapshots GROUP BY 1"
        )
    )


async def test_failing_source_restarts_while_healthy_source_keeps_writing(db_url: str) -> None:
    flaky = SyntheticSource(
        _market(1), name="flaky", account_id="A", ticks_per_second=200, fail_every=20
    )
    steady = SyntheticSource(_market(2), name="steady", account_id="B", ticks_per_second=200)
    async with open_pipeline(db_url, store_payload=True, flush_rows=10, flush_ms=50) as pipeline:
        supervisor = Supervisor(
            pipeline.sink, backoff_factory=lambda: Backoff(initial=0.01, maximum=0.05)
        )
        supervisor.add(flaky)
        supervisor.add(steady)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await wait_until(
                lambda: supervisor.registry["flaky"].restarts >= 3,
                what="three restarts of the flaky source",
            )
            steady_before = _rows_by_source(db_url).get("steady", 0)
            await wait_until(
                lambda: supervisor.registry["flaky"].restarts >= 5, what="two more restarts"
            )
            await wait_until(
                lambda: _rows_by_source(db_url).get("steady", 0) > steady_before + 50,
                what="steady rows keep arriving during restarts",
            )
            nursery.cancel_scope.cancel()
    flaky_status = supervisor.registry["flaky"]
    assert flaky_status.last_error and "failing on purpose" in flaky_status.last_error
    assert supervisor.registry["steady"].restarts == 0
    rows = _rows_by_source(db_url)
    assert rows["flaky"] >= 5 * 20, "every incarnation of the flaky source wrote its rows"
    assert rows["flaky"] == flaky.ticks_sent and rows["steady"] == steady.ticks_sent


async def test_stop_and_start_one_source(db_url: str) -> None:
    one = SyntheticSource(_market(3), name="one", account_id="A", ticks_per_second=500)
    two = SyntheticSource(_market(4), name="two", account_id="B", ticks_per_second=500)
    async with open_pipeline(db_url, store_payload=True, flush_rows=10, flush_ms=20) as pipeline:
        supervisor = Supervisor(pipeline.sink)
        supervisor.add(one)
        supervisor.add(two)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await wait_until(lambda: one.ticks_sent > 10 and two.ticks_sent > 10)
            assert supervisor.stop("one") is True
            stopped_at = one.ticks_sent
            assert supervisor.stop("one") is False
            two_at = two.ticks_sent
            await wait_until(lambda: two.ticks_sent > two_at + 50, what="two keeps running")
            assert one.ticks_sent == stopped_at, "a stopped source produced ticks"
            assert supervisor.registry["one"].state is StreamState.DISCONNECTED
            assert supervisor.start("one") is True
            await wait_until(lambda: one.ticks_sent > stopped_at + 10, what="one restarted")
            assert supervisor.registry["one"].state is StreamState.CONNECTED
            nursery.cancel_scope.cancel()
