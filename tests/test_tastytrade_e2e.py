"""Simulator -> TastytradeStream -> pipeline -> PostgreSQL, all real (sockets, database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from greeksd.model import StreamStatus
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from tests.helpers import fetch_rows
from tests.streaming import stream_until, tastytrade_stream

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def test_simulated_greeks_land_in_greek_snapshots(db_url: str) -> None:
    book = default_contracts(datetime.now(UTC).date(), 4)
    status = StreamStatus("tastytrade")
    async with open_tastytrade_sim(contracts=book, tick_interval=0.02, nan_rho_rate=0.3) as sim:
        await stream_until(
            db_url,
            [(tastytrade_stream(sim), status)],
            lambda: status.ticks >= 80,
            what="80 ticks",
            flush_rows=20,
        )
    rows = fetch_rows(
        db_url,
        "SELECT broker, account_id, contract_key, underlying, quantity, multiplier, mark,"
        " implied_volatility, delta, gamma, theta, rho, vega, underlying_price, event_time"
        " FROM greek_snapshots",
    )
    assert len(rows) == status.ticks, "every row the stream produced was stored"
    sent = {(s.contract_key, s.time_ms): s for s in sim.sent_events}
    held = {str(c.key): c for c in book}
    for broker, account, key, underlying, quantity, multiplier, *values, event_time in rows:
        event = sent[(key, (event_time - EPOCH) // timedelta(milliseconds=1))]
        assert (broker, account, underlying) == ("tastytrade", sim.account, held[key].underlying)
        assert (quantity, multiplier) == (held[key].quantity, Decimal(100))
        assert tuple(values) == (
            event.price,
            event.volatility,
            event.delta,
            event.gamma,
            event.theta,
            event.rho,
            event.vega,
            event.underlying_price,
        )
    rho_nulls = [row for row in rows if row[11] is None]
    assert rho_nulls and len(rho_nulls) < len(rows), "NaN rho is stored as NULL, others kept"
    assert {row[2] for row in rows} == set(held)


async def test_futures_options_land_under_their_keys_with_their_futures_prices(
    db_url: str,
) -> None:
    """A book with ES, CL and ZN futures options: rows under '/ESZ26 EW3 ...' keys, the
    product root as underlying, the contract multiplier (50, 1000), and the price of the
    option's own future as underlying_price."""
    today = datetime.now(UTC).date()
    status = StreamStatus("tastytrade")
    async with open_tastytrade_sim(
        contracts=default_contracts(today, 2), futures_options=3, tick_interval=0.02
    ) as sim:
        futures = [c for c in sim.market.contracts if c.key.future]
        await stream_until(
            db_url,
            [(tastytrade_stream(sim), status)],
            lambda: status.ticks >= 100,
            what="100 ticks",
            flush_rows=20,
        )
    rows = fetch_rows(
        db_url,
        "SELECT contract_key, underlying, quantity, multiplier, delta, underlying_price,"
        " event_time FROM greek_snapshots WHERE left(contract_key, 1) = '/'",
    )
    held = {str(c.key): c for c in futures}
    assert {row[0] for row in rows} == set(held), "every futures option has rows"
    assert {k.split(" ")[0] for k in held} == {f"/{c.underlying}" for c in futures}
    sent = {(s.contract_key, s.time_ms): s for s in sim.sent_events}
    for key, underlying, quantity, multiplier, delta, price, event_time in rows:
        contract = held[key]
        event = sent[(key, (event_time - EPOCH) // timedelta(milliseconds=1))]
        assert underlying == contract.underlying[:-3]  # 'ES' for '/ESZ26 EW3 ...'
        assert (quantity, multiplier) == (contract.quantity, contract.multiplier)
        assert (delta, price) == (event.delta, event.underlying_price)
    assert {(row[1], row[3]) for row in rows} == {
        ("ES", Decimal(50)),
        ("CL", Decimal(1000)),
        ("ZN", Decimal(1000)),
    }
    counters = status.counters
    assert (counters.unsupported_positions, counters.unparsable_positions) == (0, 0)
    assert status.subscriptions == 5
