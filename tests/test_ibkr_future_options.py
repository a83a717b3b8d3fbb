"""IBKR futures options end to end: the simulated gateway serves FOP positions the way real
gateways do (bare position, /trsrv/secdef, the future's /iserver/contract/{conid}/info),
greeksd streams them over real sockets into PostgreSQL under the futures-option key, with
the future's price (field 31 of its conid) as the underlying price."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import trio

from greeksd.brokers.ibkr.probe import probe_ibkr
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.model import StreamStatus
from greeksd.pipeline import open_pipeline
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from tests.helpers import ListSink, fetch_rows, wait_until
from tests.test_ibkr_stream import sent_state

FOP_FUTURE_PRODUCTS = {"EW3": ("ES", 50), "LO": ("CL", 1000), "OZN": ("ZN", 1000)}


async def test_futures_options_are_stored_under_their_key_with_the_futures_price(
    db_url: str,
) -> None:
    book = default_contracts(datetime.now(UTC).date(), 3)
    status = StreamStatus("ibkr")
    async with open_ibkr_sim(book, tick_interval=None, futures_options=3) as sim:
        fops = [c for c in sim.market.contracts if c.key.is_future_option]
        futures = {c.key: sim.underlying_conids[c.underlying] for c in fops}
        async with (
            open_pipeline(db_url, flush_rows=20, flush_ms=50) as pipeline,
            trio.open_nursery() as nursery,
        ):
            stream = IbkrStream(sim.url, rest_min_interval=0.0)
            nursery.start_soon(stream.run, pipeline.sink, status)
            # 6 options + 3 equity underlyings (AAPL, SPY, SPX) + 3 futures
            await wait_until(lambda: len(sim.lines()) == 12, what="subscribed")
            assert set(futures.values()) <= sim.lines()
            for _ in range(4 * len(sim.market.contracts)):
                sim.tick()
            expected = sum(1 for t in sim.sent_ticks if t.key is not None)
            await wait_until(lambda: status.ticks == expected, what="every tick read")
            nursery.cancel_scope.cancel()
        assert f"/v1/api/iserver/contract/{futures[fops[0].key]}/info" in sim.rest_calls
    rows = fetch_rows(
        db_url,
        """
        SELECT DISTINCT ON (contract_key) contract_key, underlying, multiplier, quantity,
               expiration, strike, underlying_price, delta
        FROM greek_snapshots WHERE starts_with(contract_key, '/')
        ORDER BY contract_key, received_at DESC""",
    )
    assert {r[0] for r in rows} == {str(c.key) for c in fops}
    assert any(r[0].startswith("/ES") and " EW3 " in r[0] for r in rows)
    for key, underlying, multiplier, quantity, expiration, strike, und_price, delta in rows:
        contract = next(c for c in fops if str(c.key) == key)
        root, points = FOP_FUTURE_PRODUCTS[contract.key.root]
        assert (underlying, multiplier, quantity) == (root, points, contract.quantity)
        assert (expiration, strike) == (contract.key.expiration, contract.key.strike)
        assert und_price == float(sent_state(sim, futures[contract.key])["31"])
        assert delta == float(sent_state(sim, sim.conid_of(contract.key))["7308"])
    counters = status.counters
    assert (counters.unsupported_positions, counters.unparsable_positions) == (0, 0)


async def test_a_futures_option_whose_future_is_unknown_is_counted_with_its_reason() -> None:
    """A FOP position the gateway cannot describe (no secdef, so no undConid): the rest of
    the book streams, this one is counted as unsupported, the status says why."""
    status, sink = StreamStatus("ibkr"), ListSink()
    async with open_ibkr_sim(tick_interval=0.01, futures_options=1) as sim:
        sim.extra_positions.append(
            {
                "acctId": sim.account,
                "conid": "784136636",
                "contractDesc": "ES     JUN2025 6040 C (E2D)",
                "position": -1.0,
                "expiry": None,
                "putOrCall": None,
                "multiplier": None,
                "strike": 0.0,
                "assetClass": "FOP",
                "undConid": 0,
            }
        )
        (fop,) = [c for c in sim.market.contracts if c.key.is_future_option]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(IbkrStream(sim.url, rest_min_interval=0.0).run, sink, status)
            await wait_until(lambda: sink.latest(str(fop.key)) is not None, what="FOP rows")
            nursery.cancel_scope.cancel()
    counters = status.counters
    assert counters.unsupported_positions == 1 and counters.unparsable_positions == 0
    assert counters.unsupported_reasons == {
        "futures option 784136636: the gateway names no future"
        " (no undConid in its position or secdef)": 1
    }
    assert status.as_json()["unsupported_positions"] == 1


async def test_probe_coverage_counts_futures_options(tmp_path: Path) -> None:
    async with open_ibkr_sim(tick_interval=0.01, futures_options=3) as sim:
        code = await probe_ibkr(sim.url, duration_s=1.5, out_dir=tmp_path, rest_min_interval=0.0)
    summary = json.loads((tmp_path / "ibkr-probe.json").read_text())
    rows = list(csv.DictReader((tmp_path / "ibkr-probe-coverage.csv").open()))
    assert code == 0, summary
    assert summary["contracts"] == summary["contracts_with_greeks"] == 11
    assert summary["coverage"]["subscribed"] == 11
    fop_keys = {str(c.key) for c in sim.market.contracts if c.key.is_future_option}
    assert len(fop_keys) == 3 and fop_keys <= {r["contract_key"] for r in rows}
