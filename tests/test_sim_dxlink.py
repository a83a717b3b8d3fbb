"""The DXLink simulator is as strict as the protocol notes, and does on demand what real
servers do on their own. Spoken to with raw JSON over a real websocket (no greeksd client
code), then greeksd's client against each behaviour.

Where greeksd's client mishandles a real-server behaviour the test is an
`xfail(strict=True)` naming the client bug: fixing the client turns it into a failure
that asks for the marker to go.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from greeksd.brokers.tastytrade import protocol as dx
from greeksd.model import StreamState
from greeksd.sim.dxlink_server import DxLinkServer, greeks_event
from greeksd.sim.market import SyntheticMarket, default_contracts
from greeksd.sim.symbols import streamer_symbol
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from tests.helpers import wait_until
from tests.test_tastytrade_stream import (
    assert_rows_match_sent,
    contracts,
    counters,
    event_ms,
    running_stream,
)

TOKEN = "good-token"
SETUP = {
    "type": "SETUP",
    "channel": 0,
    "version": "0.1-raw-test",
    "keepaliveTimeout": 60,
    "acceptKeepaliveTimeout": 60,
}
AUTH = {"type": "AUTH", "channel": 0, "token": TOKEN}
CHANNEL = {
    "type": "CHANNEL_REQUEST",
    "channel": 1,
    "service": "FEED",
    "parameters": {"contract": "AUTO"},
}
GREEKS = ["eventType", "eventSymbol", "time", "delta", "gamma", "rho"]
QUOTE = ["eventType", "eventSymbol", "bidPrice", "askPrice"]
FEED_SETUP = {
    "type": "FEED_SETUP",
    "channel": 1,
    "acceptAggregationPeriod": 0.1,
    "acceptDataFormat": "COMPACT",
    "acceptEventFields": {"Greeks": GREEKS, "Quote": QUOTE},
}
STAGES = ("fresh", "setup", "authorized", "open")


@asynccontextmanager
async def dxlink(**options: Any) -> AsyncIterator[DxLinkServer]:
    today = datetime.now(UTC).date()
    market = SyntheticMarket(default_contracts(today, 2), as_of=today, seed=3)
    options.setdefault("tick_interval", 0.02)
    server = DxLinkServer(market, token_valid=lambda token: token == TOKEN, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


class Raw:
    """A client that sends JSON as given and reads whatever comes back."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, skip: tuple[str, ...] = ("KEEPALIVE",)) -> dict[str, Any]:
        with trio.fail_after(5):
            while True:
                message: dict[str, Any] = json.loads(await self.ws.get_message())
                if message["type"] not in skip:
                    return message

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        message = await self.recv(skip=("KEEPALIVE", "FEED_DATA"))
        assert message["type"] == kind, message
        assert {k: message.get(k) for k in fields} == fields, message
        return message

    async def advance(self, stage: str) -> None:
        """Walk the valid handshake up to `stage`."""
        if STAGES.index(stage) >= 1:
            await self.send(SETUP)
            await self.expect("SETUP")
            await self.expect("AUTH_STATE", state="UNAUTHORIZED")
        if STAGES.index(stage) >= 2:
            await self.send(AUTH)
            await self.expect("AUTH_STATE", state="AUTHORIZED")
        if STAGES.index(stage) >= 3:
            await self.send(CHANNEL)
            await self.expect("CHANNEL_OPENED", channel=1)


@asynccontextmanager
async def raw_client(server: DxLinkServer) -> AsyncIterator[Raw]:
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/realtime") as ws:
        yield Raw(ws)


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not None}


SUBSCRIBE = {"type": "FEED_SUBSCRIPTION", "channel": 1}
REFUSALS: list[tuple[str, str, dict[str, Any] | str, str, str]] = [
    # (case, stage, message, ERROR code, reason fragment)
    (
        "unknown type",
        "setup",
        {"type": "SUBSCRIBE", "channel": 0},
        "UNSUPPORTED_PROTOCOL",
        "unknown message type",
    ),
    ("not JSON", "setup", '{"type": "SETUP",', "BAD_ACTION", "not valid JSON"),
    ("no channel", "fresh", _with(SETUP, channel=None), "BAD_ACTION", "SETUP without channel"),
    (
        "SETUP without version",
        "fresh",
        _with(SETUP, version=None),
        "BAD_ACTION",
        "SETUP without version",
    ),
    (
        "misspelled SETUP field",
        "fresh",
        {**SETUP, "keepAliveTimeout": 60},
        "BAD_ACTION",
        "unknown field 'keepAliveTimeout'",
    ),
    (
        "timeout as text",
        "fresh",
        {**SETUP, "keepaliveTimeout": "60"},
        "BAD_ACTION",
        "keepaliveTimeout must be",
    ),
    ("SETUP off channel 0", "fresh", {**SETUP, "channel": 1}, "BAD_ACTION", "belongs on channel 0"),
    ("AUTH before SETUP", "fresh", AUTH, "BAD_ACTION", "AUTH before SETUP"),
    ("token not a string", "setup", {**AUTH, "token": 123}, "BAD_ACTION", "AUTH.token must be"),
    (
        "channel before AUTHORIZED",
        "setup",
        CHANNEL,
        "UNAUTHORIZED",
        "CHANNEL_REQUEST before AUTHORIZED",
    ),
    (
        "even channel",
        "authorized",
        {**CHANNEL, "channel": 2},
        "BAD_ACTION",
        "Protocol violation with an even channel usage.",
    ),
    (
        "channel as text",
        "authorized",
        {**CHANNEL, "channel": "1"},
        "BAD_ACTION",
        "channel must be an integer",
    ),
    (
        "no parameters",
        "authorized",
        _with(CHANNEL, parameters=None),
        "BAD_ACTION",
        "CHANNEL_REQUEST without parameters",
    ),
    (
        "unknown contract",
        "authorized",
        {**CHANNEL, "parameters": {"contract": "LIVE"}},
        "BAD_ACTION",
        "contract must be",
    ),
    (
        "FEED_SETUP before CHANNEL_OPENED",
        "authorized",
        FEED_SETUP,
        "BAD_ACTION",
        "channel 1, which is not open",
    ),
    (
        "FEED_SETUP on another channel",
        "open",
        {**FEED_SETUP, "channel": 3},
        "BAD_ACTION",
        "channel 3, which is not open",
    ),
    (
        "unknown data format",
        "open",
        {**FEED_SETUP, "acceptDataFormat": "BINARY"},
        "BAD_ACTION",
        "acceptDataFormat must be",
    ),
    (
        "unknown event type",
        "open",
        {**FEED_SETUP, "acceptEventFields": {"Greek": ["eventSymbol"]}},
        "BAD_ACTION",
        "unknown event type 'Greek'",
    ),
    (
        "unknown event field",
        "open",
        {**FEED_SETUP, "acceptEventFields": {"Greeks": ["eventSymbol", "iv"]}},
        "BAD_ACTION",
        "unknown fields ['iv']",
    ),
    (
        "repeated event field",
        "open",
        {**FEED_SETUP, "acceptEventFields": {"Greeks": ["delta", "delta"]}},
        "BAD_ACTION",
        "repeats a field",
    ),
    (
        "misspelled FEED_SETUP field",
        "open",
        {"type": "FEED_SETUP", "channel": 1, "eventFields": {}},
        "BAD_ACTION",
        "unknown field 'eventFields'",
    ),
    (
        "subscription on another channel",
        "open",
        {**SUBSCRIBE, "channel": 5, "add": []},
        "BAD_ACTION",
        "channel 5, which is not open",
    ),
    (
        "subscription without symbol",
        "open",
        {**SUBSCRIBE, "add": [{"type": "Greeks"}]},
        "BAD_ACTION",
        "without symbol",
    ),
    (
        "subscription of an unknown type",
        "open",
        {**SUBSCRIBE, "add": [{"type": "Greek", "symbol": "X"}]},
        "BAD_ACTION",
        "unknown event type 'Greek'",
    ),
    (
        "subscription with an extra key",
        "open",
        {**SUBSCRIBE, "remove": [{"type": "Quote", "symbol": "X", "sym": "X"}]},
        "BAD_ACTION",
        "unknown field 'sym'",
    ),
    (
        "reset as text",
        "open",
        {**SUBSCRIBE, "reset": "true"},
        "BAD_ACTION",
        "reset must be true or false",
    ),
    (
        "a server message",
        "open",
        {"type": "FEED_DATA", "channel": 1, "data": []},
        "BAD_ACTION",
        "FEED_DATA is a server message",
    ),
]


@pytest.mark.parametrize(
    ("stage", "message", "code", "reason"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
async def test_the_simulator_refuses_what_the_protocol_forbids(
    stage: str, message: dict[str, Any] | str, code: str, reason: str
) -> None:
    async with dxlink() as server, raw_client(server) as client:
        await client.advance(stage)
        await client.send(message)
        error = await client.expect("ERROR", channel=0, error=code)
        assert reason in error["message"]
        ((rejection),) = server.rejections
        assert (rejection.error, rejection.reason) == (code, error["message"])
        if stage == "open":  # a refusal is not the end: the channel still works
            await client.send(FEED_SETUP)
            await client.expect("FEED_CONFIG", channel=1)


async def test_a_valid_session_is_refused_nothing() -> None:
    """The negative of the table: every message the table breaks, sent right, passes."""
    async with dxlink() as server, raw_client(server) as client:
        await client.advance("open")
        await client.send(FEED_SETUP)
        await client.expect("FEED_CONFIG", channel=1)
        symbol = streamer_symbol(server.market.contracts[0].key)
        add = [{"type": "Greeks", "symbol": symbol}, {"type": "Quote", "symbol": "AAPL"}]
        await client.send({**SUBSCRIBE, "reset": True, "add": add})
        await client.send({**SUBSCRIBE, "remove": [{"type": "Quote", "symbol": "AAPL"}]})
        await client.send({"type": "KEEPALIVE", "channel": 0})
        await client.send({"type": "CHANNEL_CANCEL", "channel": 1})
        await client.expect("CHANNEL_CLOSED", channel=1)
        assert server.rejections == []


async def test_an_oversized_subscription_closes_the_socket_with_1009() -> None:
    async with dxlink(max_message_bytes=16 * 1024) as server:
        add = [{"type": "Greeks", "symbol": f".AAPL{n:06d}C190"} for n in range(600)]
        async with raw_client(server) as client:
            await client.advance("open")
            await client.send({**SUBSCRIBE, "add": add})  # about 30 KiB
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.reason is not None and closed.value.reason.code == 1009
        assert [r.error for r in server.rejections] == ["MESSAGE_TOO_BIG"]
        async with raw_client(server) as client:  # the same symbols in chunks are fine
            await client.advance("open")
            for start in range(0, len(add), 150):
                await client.send({**SUBSCRIBE, "add": add[start : start + 150]})
            (conn,) = server.connections.values()
            await wait_until(lambda: len(conn.channels[1].subscriptions) == 600, what="all 600")
        assert len(server.rejections) == 1


# ---------------------------------------------------------------- what real servers do


async def subscribe_all(client: Raw, server: DxLinkServer) -> None:
    await client.advance("open")
    await client.send(FEED_SETUP)
    await client.expect("FEED_CONFIG", eventFields={"Greeks": GREEKS, "Quote": QUOTE})
    book = server.market.contracts
    add = [{"type": "Greeks", "symbol": streamer_symbol(c.key)} for c in book]
    add += [{"type": "Quote", "symbol": c.underlying} for c in book]
    await client.send({**SUBSCRIBE, "add": add})


def greeks_values(data: list[Any]) -> list[Any]:
    return next(
        values for kind, values in zip(data[::2], data[1::2], strict=True) if kind == "Greeks"
    )


async def test_feed_config_resent_for_one_type_reorders_only_that_type() -> None:
    async with dxlink() as server, raw_client(server) as client:
        await subscribe_all(client, server)
        data = await client.recv()
        values = greeks_values(data["data"])
        assert values[0] == "Greeks" and values[1].startswith(".")  # the order we asked for
        assert await server.reorder_fields("Greeks") == 1
        config = await client.recv(skip=("KEEPALIVE", "FEED_DATA"))
        assert config == {
            "type": "FEED_CONFIG",
            "channel": 1,
            "dataFormat": "COMPACT",
            "aggregationPeriod": 0.1,
            "eventFields": {"Greeks": GREEKS[::-1]},  # Quote's layout is not repeated
        }
        data = await client.recv()
        values = greeks_values(data["data"])
        assert values[-1] == "Greeks" and values[-2].startswith(".")  # the new order
        quotes = data["data"][data["data"].index("Quote") + 1]
        assert quotes[0] == "Quote" and isinstance(quotes[1], str)  # as first agreed


@pytest.mark.parametrize("refusal", ["error", "silent"])
async def test_a_channel_request_can_be_refused_or_never_answered(refusal: str) -> None:
    async with dxlink() as server, raw_client(server) as client:
        server.channel_refusal = refusal
        await client.advance("authorized")
        await client.send(CHANNEL)
        if refusal == "error":
            await client.expect("ERROR", error="BAD_ACTION", message="channel 1 refused")
        # the next thing we hear about channel 1 is that it is not open: no CHANNEL_OPENED
        await client.send(FEED_SETUP)
        error = await client.expect("ERROR", error="BAD_ACTION")
        assert "which is not open" in error["message"]
        (conn,) = server.connections.values()
        assert conn.channels == {} and conn.pending == ({1} if refusal == "silent" else set())


async def test_error_unauthorized_after_authorization_is_informational() -> None:
    async with dxlink() as server, raw_client(server) as client:
        await client.advance("authorized")
        await server.send_error("UNAUTHORIZED", "not entitled to this feed")
        await client.expect("ERROR", error="UNAUTHORIZED", message="not entitled to this feed")
        await client.send(CHANNEL)  # still authorized
        await client.expect("CHANNEL_OPENED", channel=1)
        assert server.rejections == []


async def test_auth_state_can_come_before_setup_and_timeouts_as_integers() -> None:
    async with dxlink(keepalive_timeout=60.0) as server:
        server.auth_state_first = True
        server.integer_timeouts = True
        async with raw_client(server) as client:
            await client.expect("AUTH_STATE", state="UNAUTHORIZED")  # before we said anything
            await client.send(SETUP)
            setup = await client.ws.get_message()
            assert '"keepaliveTimeout":60,' in setup and '"acceptKeepaliveTimeout":60}' in setup
            await client.send(AUTH)  # the next AUTH_STATE is the answer, not a repeat
            await client.expect("AUTH_STATE", state="AUTHORIZED")


# ---------------------------------------------------------------- greeksd's client


async def test_our_client_breaks_no_rule_and_survives_reorder_and_early_auth_state() -> None:
    async with open_tastytrade_sim(contracts=contracts(3), tick_interval=0.02) as sim:
        sim.dxlink.auth_state_first = sim.dxlink.integer_timeouts = True
        async with running_stream(sim) as (_, sink, status):
            await wait_until(lambda: len(sink.rows) >= 20, what="first rows")
            await sim.dxlink.reorder_fields("Greeks")
            mark = len(sink.rows)
            await wait_until(lambda: len(sink.rows) >= mark + 20, what="rows after the reorder")
            await sim.drop()
            await wait_until(lambda: status.reconnects == 1, what="reconnect")
            mark = len(sink.rows)
            await wait_until(lambda: len(sink.rows) >= mark + 10, what="rows after reconnect")
            assert status.rejected_frames == 0
    assert sim.dxlink.rejections == []
    setups = [m for c in sim.dxlink.all_connections() for _, m in c.received_of("SETUP")]
    assert len(setups) == 2 and all(  # 60, as the spec types it, not 60.0
        type(m["keepaliveTimeout"]) is int and type(m["acceptKeepaliveTimeout"]) is int
        for m in setups
    ), setups
    assert_rows_match_sent(sink.rows, sim.sent_events)


SWAPPED = tuple(  # a reorder that decodes silently wrong: delta<->gamma, rho<->vega
    {"delta": "gamma", "gamma": "delta", "rho": "vega", "vega": "rho"}.get(f, f)
    for f in dx.GREEKS_FIELDS
)


@pytest.mark.parametrize("order", [None, SWAPPED], ids=["reversed", "swapped"])
async def test_our_client_merges_feed_configs_per_event_type(
    order: tuple[str, ...] | None,
) -> None:
    """FEED_CONFIG again for Greeks (a new order), then for Quote alone: Greeks must keep
    the new order, so every row stored after either one holds the values sent."""
    async with (
        open_tastytrade_sim(contracts=contracts(2), tick_interval=0.02) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 5, what="first rows")
        assert await sim.dxlink.reorder_fields("Greeks", order) == 1
        mark = len(sink.rows)
        await wait_until(lambda: len(sink.rows) >= mark + 5, what="rows after the Greeks config")
        assert await sim.dxlink.reorder_fields("Quote") == 1
        mark = len(sink.rows)
        await wait_until(lambda: len(sink.rows) >= mark + 10, what="rows after the Quote config")
        assert status.rejected_frames == 0
    assert_rows_match_sent(sink.rows[mark:], sim.sent_events)  # those after both configs
    assert_rows_match_sent(sink.rows, sim.sent_events)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("UNAUTHORIZED", "not entitled to Summary"),
        ("TIMEOUT", "no keepalive for 60s"),
        ("UNKNOWN", "something happened"),
    ],
)
async def test_our_client_keeps_its_session_through_an_informational_error(
    code: str, text: str
) -> None:
    async with (
        open_tastytrade_sim(contracts=contracts(2), tick_interval=0.02) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 5, what="first rows")
        await sim.dxlink.send_error(code, text)
        await wait_until(lambda: counters(status).server_errors == 1, what="error seen")
        mark = len(sink.rows)
        await wait_until(lambda: len(sink.rows) >= mark + 10, what="rows after the error")
        assert counters(status).informational_errors == 1
        assert status.state is StreamState.CONNECTED and status.reason is None
        assert status.reconnects == 0 and counters(status).token_fetches == 1
        assert len(sim.dxlink.all_connections()) == 1  # the same link throughout
    assert sim.quote_token_requests == 1
    assert_rows_match_sent(sink.rows, sim.sent_events)


@pytest.mark.parametrize("open_access", [False, True], ids=["unauthorized", "authorized"])
async def test_our_client_keeps_alive_whatever_the_server_announces_first(
    open_access: bool, mock_clock: trio.testing.MockClock
) -> None:
    """AUTH_STATE (UNAUTHORIZED, or AUTHORIZED from a server that needs no token) before
    the server's SETUP: KEEPALIVE still goes out every half of the server's timeout, and
    the silence watchdog still ends a link whose server stops talking."""
    mock_clock.autojump_threshold = 0.02
    async with open_tastytrade_sim(
        contracts=contracts(1), keepalive_timeout=10, tick_interval=1000
    ) as sim:
        sim.dxlink.auth_state_first = True
        sim.dxlink.open_access = open_access
        async with running_stream(sim, keepalive_timeout=20, positions_refresh_s=1000) as (
            _,
            _sink,
            status,
        ):
            await wait_until(lambda: status.state is StreamState.CONNECTED, what="connected")
            (conn,) = sim.dxlink.connections.values()
            await trio.sleep(61)
            times = [at for at, _ in conn.received_of("KEEPALIVE")]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert len(times) >= 11, times
            assert all(abs(gap - 5.0) < 0.1 for gap in gaps), gaps
            assert status.reconnects == 0
            assert len(conn.received_of("AUTH")) == (0 if open_access else 1)
            sim.stall()
            last_heard = conn.liveness.last_sent  # the server's last message to us
            await wait_until(lambda: status.reconnects >= 1, what="dead link noticed", poll=1.0)
            assert conn.closed_at is not None
            assert abs(conn.closed_at - (last_heard + 20)) < 0.5, conn.closed_at - last_heard
    assert sim.dxlink.rejections == []


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        ("error", "channel 1 refused (BAD_ACTION): channel 1 refused"),
        ("silent", "channel 1 not opened within 10 s"),
    ],
)
async def test_our_client_does_not_wait_forever_for_a_channel(
    refusal: str, reason: str, mock_clock: trio.testing.MockClock
) -> None:
    """A CHANNEL_REQUEST refused or never answered: `degraded` with the reason within the
    10 s deadline, requested again with backoff on the same link, rows once it opens."""
    mock_clock.autojump_threshold = 0.02
    async with open_tastytrade_sim(contracts=contracts(1), tick_interval=0.5) as sim:
        sim.dxlink.channel_refusal = refusal
        async with running_stream(sim) as (_, sink, status):
            start = trio.current_time()
            await wait_until(
                lambda: status.state is StreamState.DEGRADED, what="degraded", poll=0.25
            )
            elapsed = trio.current_time() - start
            assert status.reason == reason
            assert elapsed <= 10.5 and (refusal == "error" or elapsed >= 9.9), elapsed
            await wait_until(
                lambda: counters(status).channel_retries >= 2, what="retries", poll=1.0
            )
            await trio.sleep(61)  # a positions refresh must not paper over the problem
            assert status.state is StreamState.DEGRADED and status.reason == reason
            retries = counters(status).channel_retries
            assert 3 <= retries <= (12 if refusal == "error" else 6), retries
            assert sink.rows == []
            sim.dxlink.channel_refusal = None
            await wait_until(lambda: len(sink.rows) >= 3, what="rows once it opens", poll=1.0)
            assert status.state is StreamState.CONNECTED and status.reason is None
            assert status.reconnects == 0 and len(sim.dxlink.all_connections()) == 1
            counter = "channel_refusals" if refusal == "error" else "channel_open_timeouts"
            assert getattr(counters(status), counter) == counters(status).channel_retries
    assert sim.dxlink.rejections == []  # nothing was sent to the channel before it opened
    assert_rows_match_sent(sink.rows, sim.sent_events)


async def test_our_client_counts_removal_events_and_stores_no_tick_for_them() -> None:
    async with (
        open_tastytrade_sim(contracts=contracts(1), tick_interval=0.05) as sim,
        running_stream(sim) as (_, sink, status),
    ):
        await wait_until(lambda: len(sink.rows) >= 3, what="first rows")
        (conn,) = sim.dxlink.connections.values()
        ((_, feed_setup),) = conn.received_of("FEED_SETUP")
        assert {"eventFlags", "index"} <= set(feed_setup["acceptEventFields"]["Greeks"])
        symbol = streamer_symbol(sim.dxlink.market.contracts[0].key)
        removal_ms, snapshot_ms = 1_000_000_000_001, 1_000_000_000_002
        names = ("price", "volatility", "delta", "gamma", "theta", "rho", "vega")
        nan: dict[str, Any] = dict.fromkeys(names, "NaN")
        quarter: dict[str, Any] = dict.fromkeys(names, 0.25)
        removal = greeks_event(symbol, removal_ms, **nan)
        values = greeks_event(symbol, snapshot_ms, **quarter)
        await sim.dxlink.inject_greeks({**removal, "eventFlags": dx.REMOVE_EVENT})
        await sim.dxlink.inject_greeks(
            {**values, "eventFlags": dx.SNAPSHOT_BEGIN | dx.SNAPSHOT_END}
        )
        await wait_until(
            lambda: any(event_ms(r) == snapshot_ms for r in sink.rows), what="snapshot row"
        )
        assert counters(status).removed_events == 1
        assert [event_ms(r) for r in sink.rows].count(removal_ms) == 0
        (row,) = [r for r in sink.rows if event_ms(r) == snapshot_ms]
        assert row.source_payload is not None
        assert row.delta == 0.25 and row.source_payload["eventFlags"] == 12
        assert status.rejected_frames == 0
