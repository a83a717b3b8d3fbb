"""TastytradeStream against the simulator over real sockets (REST + DXLink)."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import trio
import trio.testing
from trio_websocket import open_websocket_url

from greeksd.backoff import Backoff
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.connection import TastytradeCounters
from greeksd.brokers.tastytrade.probe import probe_tastytrade
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.model import ContractKey, OptionRight, Snapshot, StreamState, StreamStatus
from greeksd.sim.dxlink_server import SentGreeks
from greeksd.sim.market import SimContract, default_contracts
from greeksd.sim.symbols import dxfeed_option, tastytrade_future_option
from greeksd.sim.tastytrade_api import TastytradeSim, open_tastytrade_sim
from tests.helpers import ListSink, wait_until

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def counters(status: StreamStatus) -> TastytradeCounters:
    """The stream's own counters (typed, shown flat in the status JSON)."""
    assert isinstance(status.counters, TastytradeCounters)
    return status.counters


def contracts(count: int = 3) -> list[SimContract]:
    return default_contracts(datetime.now(UTC).date(), count)


def event_ms(row: Snapshot) -> int:
    return (row.event_time - EPOCH) // timedelta(milliseconds=1)


def assert_rows_match_sent(rows: list[Snapshot], sent: list[SentGreeks]) -> None:
    by_key = {(s.contract_key, s.time_ms): s for s in sent}
    for row in rows:
        event = by_key[(row.contract_key, event_ms(row))]
        assert (
            row.mark,
            row.implied_volatility,
            row.delta,
            row.gamma,
            row.theta,
            row.rho,
            row.vega,
            row.underlying_price,
        ) == (
            event.price,
            event.volatility,
            event.delta,
            event.gamma,
            event.theta,
            event.rho,
            event.vega,
            event.underlying_price,
        )


@asynccontextmanager
async def running_stream(
    sim: TastytradeSim, **options: Any
) -> AsyncIterator[tuple[TastytradeStream, ListSink, StreamStatus]]:
    api = TastytradeApi(
        sim.secret, options.pop("refresh_token", sim.refresh_token), api_url=sim.api_url
    )
    options.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
    stream = TastytradeStream(api, **options)
    sink, status = ListSink(), StreamStatus("tastytrade")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run, sink, status)
        yield stream, sink, status
        nursery.cancel_scope.cancel()


async def test_end_to_end_rows_carry_contract_identity_and_the_sent_greeks() -> None:
    book = contracts(4)
    async with (
        open_tastytrade_sim(contracts=book, tick_interval=0.02, nan_rho_rate=0.3) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 60, what="60 rows")
        assert status.state is StreamState.CONNECTED
    assert_rows_match_sent(sink.rows, sim.sent_events)
    held = {str(c.key): c for c in book}
    assert {r.contract_key for r in sink.rows} == set(held)
    for row in sink.rows:
        contract = held[row.contract_key]
        assert row.account_id == sim.account and row.underlying == contract.underlying
        assert row.quantity == contract.quantity and row.multiplier == Decimal(100)
        assert row.strike == contract.key.strike and row.option_type is contract.key.right
    assert any(r.rho is None for r in sink.rows) and any(r.rho is not None for r in sink.rows)
    assert status.ticks == len(sink.rows) and status.rejected_frames == 0
    assert status.subscriptions == 4 and counters(status).unsupported_positions == 0
    # several events per COMPACT array went over the wire
    channel_frames = [m for c in sim.dxlink.all_connections() for _, m in c.received]
    assert any(
        m["type"] == "FEED_SETUP" and m["acceptDataFormat"] == "COMPACT" for m in channel_frames
    )


async def test_rows_decode_by_requested_order_when_feed_config_omits_fields() -> None:
    async with open_tastytrade_sim(contracts=contracts(2), tick_interval=0.02) as sim:
        sim.omit_event_fields(True)
        async with running_stream(sim) as (_, sink, _status):
            await wait_until(lambda: len(sink.rows) >= 20, what="20 rows")
    assert_rows_match_sent(sink.rows, sim.sent_events)


async def test_reconnects_after_the_link_drops_and_rows_resume() -> None:
    async with (
        open_tastytrade_sim(contracts=contracts(2), tick_interval=0.02) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 10, what="first rows")
        await sim.drop()
        mark = len(sink.rows)
        await wait_until(lambda: status.reconnects >= 1, what="a reconnect")
        await wait_until(lambda: len(sink.rows) >= mark + 10, what="rows after the drop")
        assert status.state is StreamState.CONNECTED
    assert len(sim.dxlink.all_connections()) == 2
    assert sim.quote_token_requests == 1  # the token was fine: no refetch
    assert_rows_match_sent(sink.rows, sim.sent_events)


async def test_refused_token_fetches_a_fresh_one_without_an_auth_storm() -> None:
    async with (
        open_tastytrade_sim(contracts=contracts(2), tick_interval=0.02) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 5, what="first rows")
        sim.revoke_quote_tokens()  # the token in hand has expired
        await sim.drop()
        mark = len(sink.rows)
        await wait_until(lambda: len(sink.rows) >= mark + 10, what="rows with a new token")
        assert counters(status).token_fetches == 2
        assert "refused the quote token" in (status.last_error or "")
    assert sim.quote_token_requests == 2
    auths = [len(c.received_of("AUTH")) for c in sim.dxlink.all_connections()]
    assert auths == [1, 1, 1]  # accepted, refused once, accepted with the fresh token


async def test_persistent_refusal_backs_off(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.02
    async with open_tastytrade_sim(contracts=contracts(1), tick_interval=1.0) as sim:
        sim.refuse_tokens(True)
        async with running_stream(sim, backoff=Backoff(initial=1.0, maximum=30.0)) as (
            _,
            _sink,
            status,
        ):
            start = trio.current_time()
            await trio.sleep(120)
            assert status.state in (StreamState.DEGRADED, StreamState.CONNECTING)
            assert "refused" in (status.last_error or "")
    auths = [len(c.received_of("AUTH")) for c in sim.dxlink.all_connections()]
    assert set(auths) == {1}, "one AUTH per connection, never a retry storm"
    assert 4 <= len(auths) <= 12, f"{len(auths)} attempts in {trio.current_time() - start:.0f}s"


async def test_server_silence_past_the_timeout_is_a_dead_link(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02
    async with (
        open_tastytrade_sim(contracts=contracts(1), tick_interval=0.5) as sim,
        running_stream(sim, keepalive_timeout=20, handshake_timeout=5) as (
            _,
            sink,
            status,
        ),
    ):
        await wait_until(lambda: len(sink.rows) >= 3, what="first rows")
        (first,) = sim.dxlink.connections.values()
        stalled_at = trio.current_time()
        sim.stall()
        # poll in virtual time coarser than the ticks, so the clock can run ahead
        await wait_until(lambda: status.reconnects >= 1, what="dead link noticed", poll=1.0)
        closed_at = first.closed_at
        assert closed_at is not None
        assert 19.5 <= closed_at - stalled_at <= 21.5, closed_at - stalled_at
        assert "no message from DXLink for 20s" in (status.last_error or "")
        sim.stall(False)
        mark = len(sink.rows)
        await wait_until(lambda: len(sink.rows) > mark + 3, what="rows after recovery")


async def test_positions_refresh_adds_and_removes_subscriptions() -> None:
    book = contracts(2)
    extra = SimContract(
        ContractKey("QQQ", date.today() + timedelta(days=30), OptionRight.PUT, Decimal("432.5")),
        "QQQ",
        Decimal(100),
        Decimal(-4),
    )
    async with (
        open_tastytrade_sim(contracts=book, tick_interval=0.02) as sim,
        running_stream(sim, positions_refresh_s=0.2) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 5, what="first rows")
        sim.open_position(extra)
        await wait_until(
            lambda: any(r.contract_key == str(extra.key) for r in sink.rows),
            what="rows for the opened position",
        )
        assert status.subscriptions == 3
        sim.close_position(book[0].key)
        (conn,) = sim.dxlink.connections.values()
        symbol = dx.streamer_symbol(book[0].key)
        await wait_until(
            lambda: ("Greeks", symbol) not in conn.channels[1].subscriptions,
            what="closed position unsubscribed",
        )
        assert status.subscriptions == 2 and status.reconnects == 0
    new_rows = [r for r in sink.rows if r.contract_key == str(extra.key)]
    assert new_rows[0].quantity == Decimal(-4)
    assert_rows_match_sent(sink.rows, sim.sent_events)


async def test_channel_close_error_and_malformed_frames_are_survived() -> None:
    async with (
        open_tastytrade_sim(contracts=contracts(2), tick_interval=0.02) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 5, what="first rows")
        await sim.send_malformed()
        await sim.send_malformed('{"type":"FEED_DATA","channel":1,"data":["Greeks",[1,2]]}')
        await sim.send_malformed('{"type":"FEED_DATA","channel":7,"data":["Greeks",[]]}')
        await sim.send_error("BAD_ACTION", "simulated")
        await wait_until(lambda: status.rejected_frames >= 3, what="rejections counted")
        await sim.dxlink.close_channels()
        await wait_until(lambda: counters(status).channel_reopens == 1, what="reopen")
        mark = len(sink.rows)
        await wait_until(lambda: len(sink.rows) >= mark + 10, what="rows after reopen")
        assert counters(status).malformed_frame == 1
        assert counters(status).bad_event == 1
        assert counters(status).unknown_channel == 1
        assert counters(status).server_errors == 1
        assert status.reconnects == 0 and status.state is StreamState.CONNECTED
    assert_rows_match_sent(sink.rows, sim.sent_events)


async def test_refused_refresh_token_reports_degraded_with_a_clear_message() -> None:
    async with (
        open_tastytrade_sim(contracts=contracts(1)) as sim,
        running_stream(sim, refresh_token="revoked") as (_, _sink, status),
    ):
        await wait_until(lambda: status.state is StreamState.DEGRADED, what="degraded")
        assert "refused the OAuth credentials (HTTP 401" in (status.reason or "")
        assert "GREEKSD_TT_REFRESH" in (status.reason or "")


# ---------------------------------------------------------------- the simulator itself


async def raw_session(url: str, token: str) -> Any:
    ws_cm = open_websocket_url(url)
    ws = await ws_cm.__aenter__()
    await ws.send_message(dx.build(dx.Setup(60, 60, dx.CLIENT_VERSION)))
    first = [dx.parse(await ws.get_message()) for _ in range(2)]
    assert isinstance(first[0], dx.Setup) and first[1] == dx.AuthState("UNAUTHORIZED")
    await ws.send_message(dx.build(dx.Auth(token)))
    assert dx.parse(await ws.get_message()) == dx.AuthState("AUTHORIZED", "sim-user")
    return ws_cm, ws


async def next_of(ws: Any, kind: type) -> Any:
    while True:
        message = dx.parse(await ws.get_message())
        if isinstance(message, kind):
            return message


async def test_simulator_protocol_rules() -> None:
    book = contracts(2)
    symbol = dx.streamer_symbol(book[0].key)
    async with open_tastytrade_sim(contracts=book, tick_interval=0.02, nan_rho_rate=1.0) as sim:
        ws_cm, ws = await raw_session(sim.dxlink_url, sim.issue_quote_token())
        try:
            await ws.send_message(dx.build(dx.ChannelRequest(2)))
            error = await next_of(ws, dx.Error)
            assert error.error == "BAD_ACTION" and "even channel" in error.message
            await ws.send_message(dx.build(dx.ChannelRequest(5)))
            await next_of(ws, dx.ChannelOpened)
            fields = {"Greeks": ("eventSymbol", "delta", "rho")}
            await ws.send_message(dx.build(dx.FeedSetup(5, fields, "FULL")))
            config = await next_of(ws, dx.FeedConfig)
            assert config.event_fields == fields and config.data_format == "FULL"
            await ws.send_message(dx.build(dx.FeedSubscription(5, add=(("Greeks", symbol),))))
            data = await next_of(ws, dx.FeedData)
            assert data.data[0] == {
                "eventType": "Greeks",
                "eventSymbol": symbol,
                "delta": data.data[0]["delta"],
                "rho": "NaN",
            }
            # reset replaces the subscription set: only the second contract from now on
            other = dx.streamer_symbol(book[1].key)
            await ws.send_message(
                dx.build(dx.FeedSubscription(5, add=(("Greeks", other),), reset=True))
            )
            conn = next(iter(sim.dxlink.connections.values()))
            await wait_until(lambda: conn.channels[5].subscriptions == {("Greeks", other)})
            data = await next_of(ws, dx.FeedData)
            data = await next_of(ws, dx.FeedData)
            assert {e["eventSymbol"] for e in data.data} == {other}
        finally:
            await ws_cm.__aexit__(None, None, None)


async def test_simulator_closes_a_silent_client_with_error_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02
    async with open_tastytrade_sim(
        contracts=contracts(1), keepalive_timeout=30, tick_interval=5
    ) as sim:
        ws_cm, ws = await raw_session(sim.dxlink_url, sim.issue_quote_token())
        try:
            start = trio.current_time()
            error = await next_of(ws, dx.Error)
            assert error.error == "TIMEOUT"
            assert 29.9 <= trio.current_time() - start <= 30.5
        finally:
            await ws_cm.__aexit__(None, None, None)


async def test_compact_frames_hold_several_events_in_one_array() -> None:
    async with open_tastytrade_sim(
        contracts=contracts(3), tick_interval=0.02, events_per_frame=3
    ) as sim:
        ws_cm, ws = await raw_session(sim.dxlink_url, sim.issue_quote_token())
        try:
            await ws.send_message(dx.build(dx.ChannelRequest(1)))
            await next_of(ws, dx.ChannelOpened)
            await ws.send_message(dx.build(dx.FeedSetup(1, {"Greeks": dx.GREEKS_FIELDS})))
            adds = tuple(("Greeks", dx.streamer_symbol(c.key)) for c in contracts(3))
            await ws.send_message(dx.build(dx.FeedSubscription(1, add=adds)))
            frame = orjson.loads(dx.build(await next_of(ws, dx.FeedData)))
            assert frame["data"][0] == "Greeks"
            assert len(frame["data"][1]) == 3 * len(dx.GREEKS_FIELDS)
        finally:
            await ws_cm.__aexit__(None, None, None)


async def test_probe_reports_coverage_and_exits_zero(tmp_path: Path) -> None:
    book = contracts(2)
    async with open_tastytrade_sim(contracts=book, tick_interval=0.02) as sim:
        api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
        code = await probe_tastytrade(api, duration_s=1.0, out_dir=tmp_path)
    assert code == 0
    summary = json.loads((tmp_path / "tastytrade-probe.json").read_text())
    assert summary["contracts_with_greeks"] == 2 and summary["hints"] == []
    assert (summary["coverage"]["subscribed"], summary["coverage"]["fresh"]) == (2, 2)
    assert 0 < summary["connect_ms"] <= summary["first_message_ms"] < 1000
    with (tmp_path / "tastytrade-probe-coverage.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["contract_key"] for r in rows} == {str(c.key) for c in book}
    assert all(r["delta"] == r["implied_volatility"] == "True" for r in rows)
    assert all(float(r["first_greeks_ms"]) > 0 for r in rows)


async def test_probe_exits_one_with_a_hint_when_no_greeks_arrive(tmp_path: Path) -> None:
    async with open_tastytrade_sim(contracts=contracts(1)) as sim:
        sim.refuse_tokens(True)
        api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
        code = await probe_tastytrade(api, duration_s=1.0, out_dir=tmp_path)
    assert code == 1
    summary = json.loads((tmp_path / "tastytrade-probe.json").read_text())
    assert summary["contracts_with_greeks"] == 0
    assert summary["coverage"]["fresh"] == 0
    assert "refused the quote token" in summary["hints"][0]


async def test_probe_counts_futures_options_in_its_coverage(tmp_path: Path) -> None:
    async with open_tastytrade_sim(
        contracts=contracts(1), futures_options=2, tick_interval=0.02
    ) as sim:
        held = sim.market.contracts
        api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
        code = await probe_tastytrade(api, duration_s=1.0, out_dir=tmp_path)
    assert code == 0
    summary = json.loads((tmp_path / "tastytrade-probe.json").read_text())
    assert summary["contracts_with_greeks"] == 3 and summary["unsupported_positions"] == 0
    assert (summary["coverage"]["subscribed"], summary["coverage"]["fresh"]) == (3, 3)
    with (tmp_path / "tastytrade-probe-coverage.csv").open() as handle:
        rows = {r["contract_key"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {str(c.key) for c in held}
    futures = [c for c in held if c.key.future]
    for contract in futures:  # the instruments API's streamer symbol, as the server has it
        row = rows[str(contract.key)]
        assert row["streamer_symbol"] == dxfeed_option(contract)
        assert row["delta"] == row["implied_volatility"] == "True"


async def test_futures_option_lookups_are_cached_and_a_failing_one_counted_and_retried() -> None:
    """A futures option the instruments API does not know (here: an expired one) is
    counted by reason and looked up again at each refresh; the known ones once only."""
    symbol = "./ESU4 EW3N4 240719C4400"
    expired = {
        "symbol": symbol,
        "instrument-type": "Future Option",
        "underlying-symbol": "/ESU4",
        "quantity": "1",
        "quantity-direction": "Long",
        "close-price": "1.0",
        "average-open-price": "1.0",
        "multiplier": "50",
        "cost-effect": "Debit",
        "is-suppressed": False,
        "is-frozen": False,
        "realized-day-gain": "0.0",
        "realized-today": "0.0",
        "created-at": "2024-01-02T15:00:00.000+00:00",
        "updated-at": "2024-01-02T15:00:00.000+00:00",
        "expires-at": "2024-07-19T20:15:00.000+00:00",
    }
    async with open_tastytrade_sim(
        contracts=contracts(1), futures_options=2, tick_interval=0.02
    ) as sim:
        sim.extra_positions.append(expired)
        held = [c for c in sim.market.contracts if c.key.future]
        async with running_stream(sim, positions_refresh_s=0.1) as (_, sink, status):
            requests = sim.future_option_requests
            await wait_until(lambda: requests.get(symbol, 0) >= 3, what="3 refreshes")
            await wait_until(
                lambda: {str(c.key) for c in held} <= {r.contract_key for r in sink.rows},
                what="rows of both futures options",
            )
    assert {s: n for s, n in requests.items() if s != symbol} == {
        tastytrade_future_option(c.key): 1 for c in held
    }
    assert counters(status).unsupported_positions == 1
    assert counters(status).unsupported_reasons == {"future option instrument lookup failed": 1}
    assert status.subscriptions == 3
