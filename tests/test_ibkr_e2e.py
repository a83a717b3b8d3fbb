"""Simulated gateway => IbkrStream => pipeline => rows in PostgreSQL, end to end."""

from __future__ import annotations

import trio

from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.model import StreamStatus
from greeksd.pipeline import open_pipeline
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from tests.helpers import fetch_rows, wait_until
from tests.test_ibkr_stream import sent_state


async def test_simulator_to_greek_snapshots_rows(db_url: str) -> None:
    async with open_ibkr_sim(tick_interval=None) as sim:
        async with open_pipeline(
            db_url, store_payload=True, flush_rows=20, flush_ms=50
        ) as pipeline:
            status = StreamStatus("ibkr")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    IbkrStream(sim.url, rest_min_interval=0.0).run, pipeline.sink, status
                )
                await wait_until(lambda: len(sim.lines()) == 13, what="subscribed")
                for _ in range(4 * len(sim.market.contracts)):
                    sim.tick()
                expected = sum(1 for t in sim.sent_ticks if t.key is not None)
                await wait_until(lambda: status.ticks == expected, what="every tick read")
                nursery.cancel_scope.cancel()
        rows = fetch_rows(
            db_url,
            """
            SELECT DISTINCT ON (contract_key) contract_key, broker, account_id, underlying,
                   quantity, delta, gamma, theta, vega, rho, implied_volatility, bid, ask,
                   last, source_payload
            FROM greek_snapshots ORDER BY contract_key, received_at DESC""",
        )
        total = fetch_rows(db_url, "SELECT count(*) FROM greek_snapshots WHERE broker='ibkr'")
        assert total[0][0] == expected
        assert {r[0] for r in rows} == {str(k) for k in sim.conids}
        for key, broker, account, underlying, qty, *values, payload in rows:
            contract = next(c for c in sim.market.contracts if str(c.key) == key)
            sent = sent_state(sim, sim.conid_of(contract.key))
            assert (broker, account, underlying, qty) == (
                "ibkr",
                sim.account,
                contract.underlying,
                contract.quantity,
            )
            delta, gamma, theta, vega, rho, iv, bid, ask, last = values
            assert (delta, gamma, theta, vega) == tuple(
                float(sent[f]) for f in ("7308", "7309", "7310", "7311")
            )
            assert rho is None and abs(iv - float(sent["7633"][:-1]) / 100) < 1e-12
            assert (bid, ask, last) == (float(sent["84"]), float(sent["86"]), float(sent["31"]))
            assert payload["7308"] == sent["7308"]


async def test_frozen_data_is_stored_flagged_never_as_live(db_url: str) -> None:
    status = StreamStatus("ibkr")
    async with (
        open_ibkr_sim(tick_interval=0.01, availability="ZpB") as sim,
        open_pipeline(db_url, store_payload=True, flush_rows=20, flush_ms=50) as pipeline,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(IbkrStream(sim.url, rest_min_interval=0.0).run, pipeline.sink, status)
        await wait_until(lambda: status.ticks > 50, what="ticks")
        nursery.cancel_scope.cancel()
    rows = fetch_rows(db_url, "SELECT market_data, count(*) FROM greek_snapshots GROUP BY 1")
    assert len(rows) == 1 and rows[0][0] == "frozen" and rows[0][1] > 50
