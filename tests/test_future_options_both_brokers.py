"""[7/7] as the issue checks it: both simulators hold the same futures options; every one
is stored under one key with rows from both brokers, in the right units, and the risk
timeline groups it under its futures product with its own multiplier.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg

from greeksd.model import StreamStatus, future_root
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts, futures_option_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from greeksd.store.queries import Filter
from greeksd.store.risk import risk_timeline
from tests.helpers import fetch_rows
from tests.streaming import ibkr_stream, stream_until, tastytrade_stream


async def test_both_brokers_store_each_futures_option_under_one_key_in_its_units(
    db_url: str,
) -> None:
    today = datetime.now(UTC).date()
    fops = futures_option_contracts(today, 3)  # ES x50, CL x1000, ZN x1000
    book = default_contracts(today, 2) + fops
    started = datetime.now(UTC)
    async with (
        open_ibkr_sim(book, tick_interval=0.01) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=0.01) as tt_sim,
    ):

        def both_brokers_hold_every_futures_option() -> bool:
            rows = fetch_rows(
                db_url,
                "SELECT contract_key FROM greek_snapshots WHERE delta IS NOT NULL"
                " AND underlying_price IS NOT NULL GROUP BY 1"
                " HAVING count(DISTINCT broker) = 2",
            )
            return {str(c.key) for c in fops} <= {key for (key,) in rows}

        await stream_until(
            db_url,
            [
                (ibkr_stream(ib_sim), StreamStatus("ibkr")),
                (tastytrade_stream(tt_sim), StreamStatus("tastytrade")),
            ],
            both_brokers_hold_every_futures_option,
            what="FOP rows from both",
            timeout=30,
            flush_ms=50,
        )
    ended = datetime.now(UTC) + timedelta(seconds=1)

    rows = fetch_rows(
        db_url,
        "SELECT contract_key, broker, underlying, multiplier, quantity, expiration,"
        " strike, option_type, max(underlying_price), min(underlying_price)"
        " FROM greek_snapshots WHERE contract_key LIKE '/%%' GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
    )
    by_key = {str(c.key): c for c in fops}
    assert {key for key, *_ in rows} == set(by_key)  # nothing else took a '/' key
    assert len(rows) == 2 * len(fops)  # one identity per key and broker, no variants
    for key, broker, underlying, multiplier, quantity, expiry, strike, right, hi, lo in rows:
        contract = by_key[key]
        assert underlying == future_root(contract.key.future), (broker, key)
        assert multiplier == contract.multiplier and quantity == contract.quantity, (broker, key)
        assert (expiry, strike, right) == (
            contract.key.expiration,
            contract.key.strike,
            contract.key.right.value,
        ), (broker, key)
        # the future's price, not an index or a share price: near the product's level
        level = {"ES": 6000.0, "CL": 62.0, "ZN": 112.0}[underlying]
        assert 0.9 * level < lo <= hi < 1.1 * level, (broker, key, lo, hi)

    # The risk timeline: one group per product, weighted by the futures option's own
    # multiplier (quantity x 50 x delta for ES), from each contract's last row.
    last = fetch_rows(
        db_url,
        "SELECT DISTINCT ON (broker, contract_key) broker, underlying, quantity * multiplier"
        " * delta FROM greek_snapshots WHERE contract_key LIKE '/%%' AND delta IS NOT NULL"
        " ORDER BY broker, contract_key, event_time DESC, received_at DESC",
    )
    expected: dict[tuple[str, str], float] = {}
    for broker, underlying, weighted in last:
        expected[broker, underlying] = expected.get((broker, underlying), 0.0) + float(weighted)
    with psycopg.connect(db_url) as conn:
        groups = risk_timeline(
            conn, Filter(start=started - timedelta(minutes=1), end=ended), 3600, 0
        )
    got = {
        (g["broker"], g["underlying"]): g["points"][-1]["delta"]
        for g in groups
        if g["underlying"] in ("ES", "CL", "ZN")
    }
    assert (
        set(got)
        == set(expected)
        == {(b, u) for b in ("ibkr", "tastytrade") for u in ("ES", "CL", "ZN")}
    )
    for group, delta in got.items():
        assert math.isclose(delta, expected[group], rel_tol=1e-9), group
    es_long_call = next(c for c in fops if c.key.root == "EW3")
    assert es_long_call.multiplier == Decimal(50)  # ES, not the equity options' 100
