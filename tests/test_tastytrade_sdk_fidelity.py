"""The real tastytrade SDK (13.x) against our simulator: if the SDK's own REST models and
DXLinkStreamer accept it, the simulator speaks Tastytrade's and dxFeed's dialects, not
just the one greeksd happens to use."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import trio
from tastytrade import Account, DXLinkStreamer, Session
from tastytrade.dxfeed import Greeks
from tastytrade.instruments import Option

from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.session import point_session_at
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim


async def test_sdk_rest_models_validate_the_simulator() -> None:
    book = default_contracts(datetime.now(UTC).date(), 3)
    async with (
        open_tastytrade_sim(contracts=book) as sim,
        Session(sim.secret, sim.refresh_token) as session,
    ):
        point_session_at(session, sim.api_url)
        (account,) = await Account.get(session)
        assert (await Account.get(session, sim.account)).account_number == sim.account
        positions = await account.get_positions(session)
        options = [p for p in positions if p.instrument_type.value == "Equity Option"]
        assert [dx.parse_occ(p.symbol) for p in options] == [c.key for c in book]
        option = await Option.get(session, options[0].symbol)
        assert option.streamer_symbol == dx.streamer_symbol(book[0].key)
    assert sim.oauth_requests == 1


async def test_sdk_streamer_receives_the_greeks_the_simulator_sent() -> None:
    book = default_contracts(datetime.now(UTC).date(), 3)
    symbols = [dx.streamer_symbol(c.key) for c in book]
    async with open_tastytrade_sim(contracts=book, tick_interval=0.02, nan_rho_rate=0) as sim:
        async with Session(sim.secret, sim.refresh_token) as session:
            point_session_at(session, sim.api_url)
            async with DXLinkStreamer(session) as streamer:
                await streamer.subscribe(Greeks, symbols)
                with trio.fail_after(10):
                    received = [await streamer.get_event(Greeks) for _ in range(30)]
        (conn,) = sim.dxlink.all_connections()
    # the SDK's dialect: channel 3 for Greeks, its own field order without eventType
    setups = [m for _, m in conn.received_of("FEED_SETUP")]
    assert setups[0]["channel"] == 3
    assert setups[0]["acceptEventFields"]["Greeks"][:4] == [
        "eventSymbol",
        "eventTime",
        "eventFlags",
        "index",
    ]
    assert sim.dxlink.rejections == []  # the SDK's dialect is valid DXLink
    sent = {(s.symbol, s.time_ms): s for s in sim.sent_events}
    for event in received:
        expected = sent[(event.event_symbol, event.time)]
        assert event.index == expected.index  # > 2**53: exact only as an integer
        assert (
            event.price,
            event.volatility,
            event.delta,
            event.gamma,
            event.theta,
            event.rho,
            event.vega,
        ) == tuple(
            Decimal(str(v))
            for v in (
                expected.price,
                expected.volatility,
                expected.delta,
                expected.gamma,
                expected.theta,
                expected.rho,
                expected.vega,
            )
        )
    assert {e.event_symbol for e in received} == set(symbols)
