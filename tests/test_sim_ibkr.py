"""The IBKR gateway simulator refuses what a real gateway refuses and does on demand what
real gateways do on their own. Spoken to over real TLS with raw text commands (httpx and
trio-websocket, no greeksd client code), then greeksd's client against each behaviour.

Where greeksd's client mishandles a real-gateway behaviour the test is an
`xfail(strict=True)` naming the client bug.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import HandshakeError, WebSocketConnection, open_websocket_url

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.session import COMPETING
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.model import StreamState, StreamStatus
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from tests.helpers import wait_until
from tests.test_ibkr_stream import ListSink, connected, requests_to, running, sent_state

AAPL = 265598
FENCE = "ech+fence"


@dataclass
class Gateway:
    sim: IbkrGatewaySim
    http: httpx.AsyncClient
    tls: ssl.SSLContext


@asynccontextmanager
async def gateway(**options: Any) -> AsyncIterator[Gateway]:
    options = {"tick_interval": None, "heartbeat_s": 3600.0, **options}
    async with open_ibkr_sim(**options) as sim:
        tls = ssl.create_default_context(cafile=str(sim.ca_file))
        async with httpx.AsyncClient(base_url=sim.url + "/v1/api", verify=tls) as http:
            yield Gateway(sim, http, tls)


class Socket:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def recv(self) -> Any:
        """The next frame (JSON decoded when it is JSON), heartbeats skipped."""
        with trio.fail_after(5):
            while True:
                text = await self.ws.get_message()
                try:
                    message = json.loads(text)
                except ValueError:
                    return text
                if not (isinstance(message, dict) and "hb" in message):
                    return message

    async def until_fence(self) -> list[Any]:
        """Everything the gateway sent in answer to what we sent before the fence: it
        answers in order, so whatever precedes the echoed fence is that answer."""
        await self.ws.send_message(FENCE)
        frames = []
        while (frame := await self.recv()) != FENCE:
            frames.append(frame)
        return frames


@asynccontextmanager
async def logged_in(gw: Gateway, *, accounts: bool = True) -> AsyncIterator[Socket]:
    """A websocket logged in by the session cookie, its login frames read."""
    session = (await gw.http.post("/tickle")).json()["session"]
    if accounts:
        assert (await gw.http.get("/iserver/accounts")).status_code == 200
    url = gw.sim.url.replace("https://", "wss://") + "/v1/api/ws"
    cookie = b"api=" + json.dumps({"session": session}).encode()
    async with open_websocket_url(
        url, ssl_context=gw.tls, extra_headers=[(b"Cookie", cookie)]
    ) as ws:
        socket = Socket(ws)
        login = await socket.until_fence()
        assert login[0]["topic"] == "system" and login[-1]["topic"] == "act", login
        yield socket


def topic_unknown(text: str) -> dict[str, Any]:
    return {"error": "Topic unknown: " + text[:20], "code": 1}


REFUSED = [
    # (command, answered with "Topic unknown", reason fragment)
    ("xyz+1+{}", True, "unknown topic 'xyz'"),
    ("smd+abc+{}", True, "needs <conid>"),
    ("smd+265598", True, "needs <conid>"),
    ('smd+265598+{"fields":["31"]', True, "not JSON"),
    ('smd+265598+["31"]', True, "not a JSON object"),
    ('{"topic":"smd+265598"}', True, "not the legacy session handshake"),
    ('smd+265598+{"field":["31"]}', False, "unknown arguments ['field']"),
    ('smd+265598+{"fields":[31,84]}', False, "field-id strings"),
    ('smd+265598+{"fields":[]}', False, "field-id strings"),
    ('umd+265598+{"fields":["31"]}', False, "umd takes {}"),
    ('str+{"all":true}', False, "str takes {}"),
]


@pytest.mark.parametrize(("command", "answered", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_the_gateway_refuses_malformed_and_unknown_commands(
    command: str, answered: bool, reason: str
) -> None:
    async with gateway() as gw, logged_in(gw) as ws:
        await ws.ws.send_message(command)
        assert await ws.until_fence() == ([topic_unknown(command)] if answered else [])
        ((rejection),) = gw.sim.rejections
        assert rejection.text == command and reason in rejection.reason
        assert gw.sim.lines() == set()


async def test_valid_commands_are_refused_nothing() -> None:
    """The negative of the table: the same topics, sent right, all act."""
    async with gateway() as gw, logged_in(gw) as ws:
        for text in (f'smd+{AAPL}+{{"fields":["31","84"]}}', 'smd+756733@ARCA+{"fields":["31"]}'):
            await ws.ws.send_message(text)
        await ws.ws.send_message("str+{}")
        answer = await ws.until_fence()
        assert [m["topic"] for m in answer] == [f"smd+{AAPL}", "smd+756733"]
        await ws.ws.send_message(f"umd+{AAPL}+{{}}")
        await ws.ws.send_message("utr")
        assert await ws.until_fence() == []
        assert gw.sim.lines() == {756733} and gw.sim.rejections == []


async def test_smd_before_iserver_accounts_is_silently_ignored() -> None:
    smd = f'smd+{AAPL}+{{"fields":["31"]}}'
    async with gateway() as gw, logged_in(gw, accounts=False) as ws:
        await ws.ws.send_message(smd)
        assert await ws.until_fence() == []  # no data, no error: "connected but no data"
        assert [r.reason for r in gw.sim.rejections] == ["smd before /iserver/accounts was called"]
        await gw.http.get("/iserver/accounts")
        await ws.ws.send_message(smd)
        (first,) = await ws.until_fence()
        assert first["topic"] == f"smd+{AAPL}" and first["6509"] == "RpB"


async def test_our_client_sends_nothing_the_gateway_refuses() -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim:
        closing = sim.market.contracts[0]
        async with running(sim, positions_refresh_s=0.1) as (_sink, status):
            await wait_until(lambda: status.ticks > 20, what="first ticks")
            sim.close_position(closing.key)  # an umd
            conid = sim.conid_of(closing.key)
            await wait_until(lambda: conid not in sim.lines(), what="unsubscribed")
            sim.drop_connections()
            await wait_until(lambda: sim.ws_connects == 2 and connected(status), what="back")
            mark = status.ticks
            await wait_until(lambda: status.ticks > mark + 20, what="ticks after reconnect")
        assert any(text == "tic" or text.startswith("umd+") for _, text in sim.received)
        assert sim.rejections == []


# ---------------------------------------------------------------- what real gateways do


async def test_sts_can_arrive_split_into_partial_frames() -> None:
    async with gateway(split_sts=True) as gw, logged_in(gw) as ws:
        gw.sim.expire_session()
        frames = await ws.until_fence()
        assert [f["args"] for f in frames] == [
            {"competing": False},
            {"message": "session expired"},
            {
                "authenticated": False,
                "fail": "",
                "serverName": "greeksd-sim",
                "serverVersion": "sim",
                "username": "simuser",
            },
        ]
        assert all(f["topic"] == "sts" for f in frames)


async def test_a_competing_login_says_so_and_stops_market_data() -> None:
    async with gateway() as gw, logged_in(gw) as ws:
        await ws.ws.send_message(f'smd+{AAPL}+{{"fields":["31"]}}')
        assert len(await ws.until_fence()) == 1
        gw.sim.compete()
        (sts,) = await ws.until_fence()
        assert sts["args"]["competing"] is True and sts["args"]["authenticated"] is True
        assert (await gw.http.post("/iserver/auth/status")).json()["competing"] is True
        gw.sim.push(AAPL, {"31": "190.01"})
        assert await ws.until_fence() == []  # no market data while competing
        gw.sim.restore()
        gw.sim.push(AAPL, {"31": "190.02"})
        frames = await ws.until_fence()
        assert frames[0]["args"]["competing"] is False and frames[1]["31"] == "190.02"


async def test_a_logged_out_gateway_answers_401_even_to_tickle() -> None:
    async with gateway() as gw:
        gw.sim.log_out()
        for method, path in (
            ("POST", "/tickle"),
            ("POST", "/iserver/auth/status"),
            ("GET", "/iserver/accounts"),
            ("GET", "/portfolio/accounts"),
        ):
            assert (await gw.http.request(method, path)).status_code == 401, path
        url = gw.sim.url.replace("https://", "wss://") + "/v1/api/ws"
        with pytest.raises(HandshakeError):
            async with open_websocket_url(url, ssl_context=gw.tls):
                pass
        gw.sim.restore()
        assert (await gw.http.post("/tickle")).status_code == 200


async def test_without_a_brokerage_bridge_iserver_answers_400_no_bridge() -> None:
    async with gateway() as gw:
        gw.sim.drop_bridge()
        response = await gw.http.get("/iserver/accounts")
        assert (response.status_code, response.json()["error"]) == (400, "no bridge")
        status = (await gw.http.post("/iserver/auth/status")).json()
        assert (status["authenticated"], status["connected"]) == (False, False)
        tickle = await gw.http.post("/tickle")
        assert tickle.status_code == 200
        assert tickle.json()["iserver"]["authStatus"]["authenticated"] is False
        assert (await gw.http.get("/portfolio/accounts")).status_code == 200


async def test_one_tic_can_get_several_replies() -> None:
    async with gateway(tic_replies=3) as gw, logged_in(gw) as ws:
        await ws.ws.send_message("tic")
        replies = await ws.until_fence()
        assert [r["topic"] for r in replies] == ["tic"] * 3
        assert all(r["alive"] is True for r in replies)


async def test_the_first_market_data_image_can_arrive_twice() -> None:
    async with gateway(duplicate_first_image=True) as gw, logged_in(gw) as ws:
        await ws.ws.send_message(f'smd+{AAPL}+{{"fields":["31","84"]}}')
        (bookkeeping,) = await ws.until_fence()
        assert set(bookkeeping) >= {"6119", "6509"} and "31" not in bookkeeping
        gw.sim.push(AAPL, {"31": "190.01", "84": "190.00"})
        gw.sim.push(AAPL, {"31": "190.02"})
        first, again, second = await ws.until_fence()
        assert first == again and first["31"] == "190.01"
        assert second["31"] == "190.02"


@pytest.mark.parametrize(("fault", "code"), [("delayed", "DpB"), ("frozen", "ZpB")])
async def test_delayed_and_frozen_data_are_marked_in_field_6509(fault: str, code: str) -> None:
    async with gateway() as gw, logged_in(gw) as ws:
        gw.sim.apply_fault(fault)
        await ws.ws.send_message(f'smd+{AAPL}+{{"fields":["31"]}}')
        (bookkeeping,) = await ws.until_fence()
        assert bookkeeping["6509"] == code
        params = {"conids": str(AAPL), "fields": "31,6509"}
        await gw.http.get("/iserver/marketdata/snapshot", params=params)  # the preflight
        (row,) = (await gw.http.get("/iserver/marketdata/snapshot", params=params)).json()
        assert row["6509"] == code


async def test_numeric_fields_can_come_as_json_numbers() -> None:
    async with gateway(numeric_values=True) as gw, logged_in(gw) as ws:
        await ws.ws.send_message(f'smd+{AAPL}+{{"fields":["31","7633"]}}')
        assert len(await ws.until_fence()) == 1  # the line is open
        gw.sim.push(AAPL, {"31": "190.125", "7633": "28.4%", "84": ""})
        (values,) = await ws.until_fence()
        assert (values["31"], values["7633"], values["84"]) == (190.125, "28.4%", "")


async def test_with_pacing_a_burst_gets_429_and_a_penalty_box(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gateway(pacing=True, penalty_s=30.0, penalty_retry_after=True) as gw:
        http = gw.http
        assert (await http.post("/tickle")).status_code == 200
        await trio.sleep(1.0)
        assert (await http.post("/tickle")).status_code == 200  # 1/s is allowed
        second = await http.post("/tickle")  # the same second: over the limit
        assert (second.status_code, second.headers["Retry-After"]) == (429, "30")
        assert (await http.get("/iserver/accounts")).status_code == 429  # in the box
        assert [path for _, path in gw.sim.pacing_violations] == ["/v1/api/tickle"]
        assert gw.sim.penalized_requests == 1
        await trio.sleep(30.0)
        statuses = [(await http.get("/iserver/accounts")).status_code for _ in range(11)]
        assert statuses == [200] * 10 + [429]  # 10 per second overall
        await trio.sleep(30.0)
        assert (await http.get("/portfolio/accounts")).status_code == 200
        await trio.sleep(4.0)
        assert (await http.get("/portfolio/accounts")).status_code == 429  # 1 per 5 s


# ---------------------------------------------------------------- greeksd's client


def distinct_option_messages(sim: IbkrGatewaySim) -> int:
    """Option market-data messages the simulator sent, a repeated image counted once
    (the simulator queues the two copies back to back)."""
    count, previous = 0, None
    for tick in sim.sent_ticks:
        count += tick != previous and tick.key is not None
        previous = tick
    return count


async def test_our_client_takes_numbers_repeated_images_and_extra_tic_replies() -> None:
    """One row per distinct market-data message: a first image sent twice adds no row,
    three `tic` replies per `tic` are no error, JSON numbers are values like strings."""
    options: dict[str, Any] = {
        "numeric_values": True,
        "duplicate_first_image": True,
        "tic_replies": 3,
    }
    async with (
        open_ibkr_sim(tick_interval=None, **options) as sim,
        running(sim, heartbeat_s=0.2) as (sink, status),
    ):
        await wait_until(lambda: len(sim.lines()) == 13 and connected(status), what="subscribed")
        for _ in range(4 * len(sim.market.contracts)):
            sim.tick()
        expected = distinct_option_messages(sim)
        assert sum(t.key is not None for t in sim.sent_ticks) > expected, "no image repeated"
        await wait_until(lambda: sum(t == "tic" for _, t in sim.received) >= 3, what="3 tics")
        await wait_until(lambda: status.ticks >= expected, what="every distinct message read")
        sim.tick()  # a fence: the socket is in order, so every repeat before it was read
        await wait_until(lambda: status.ticks >= expected + 1, what="the fence's row")
        assert len(sink.rows) == status.ticks == expected + 1
        seen = [(s.contract_key, s.event_time, s.delta, s.bid, s.last) for s in sink.rows]
        assert len(set(seen)) == len(seen), "a duplicated row"
        for key, conid in sim.conids.items():
            snap, sent = sink.latest(str(key)), sent_state(sim, conid)
            assert snap is not None and snap.delta == float(sent["7308"])
            assert (snap.bid, snap.ask) == (float(sent["84"]), float(sent["86"]))
        assert status.rejected_frames == 0 and status.reconnects == 0
        assert status.counters.gateway_errors == 0
    assert sim.rejections == []


@pytest.mark.parametrize(
    ("availability", "flag"), [("RpB", "live"), ("DpB", "delayed"), ("ZpB", "frozen")]
)
async def test_our_client_flags_delayed_and_frozen_rows_and_counts_them(
    availability: str, flag: str
) -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, availability=availability) as sim,
        running(sim) as (sink, status),
    ):
        keys = {str(k) for k in sim.conids}
        await wait_until(lambda: keys <= {s.contract_key for s in sink.rows}, what="all keys")
        assert {s.market_data for s in sink.rows} == {flag}
        n = len(keys)
        counts = {"live": (0, 0), "delayed": (n, 0), "frozen": (0, n)}[flag]
        shown = status.as_json()
        assert (shown["delayed_contracts"], shown["frozen_contracts"]) == counts


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("competing", "competing session: another login holds the brokerage session"),
        ("logged_out", "gateway not logged in: open {url} and log in"),
        ("no_bridge", "not authenticated: no bridge"),
    ],
)
async def test_our_client_degrades_with_the_reason(fault: str, reason: str) -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim, running(sim) as (_sink, status):
        reason = reason.format(url=sim.url)
        await wait_until(lambda: status.ticks > 5, what="first ticks")
        sim.apply_fault(fault)
        if fault != "competing":
            sim.drop_connections()  # the gateway's own sockets die with the session
        await wait_until(
            lambda: status.state is StreamState.DEGRADED and status.reason == reason,
            what=f"degraded: {reason}",
        )
        sim.restore()
        await wait_until(lambda: connected(status), what="connected after restore")


async def test_our_client_connects_through_a_split_sts() -> None:
    slow_retry = Backoff(initial=10.0, maximum=10.0)  # the link's own reason stays visible
    async with (
        open_ibkr_sim(tick_interval=0.01, split_sts=True) as sim,
        running(sim, backoff=slow_retry) as (_sink, status),
    ):
        await wait_until(lambda: status.ticks > 5, timeout=3, what="ticks")
        assert status.reconnects == 0
        # a split expiry: {competing}, {message}, then {authenticated: false} ends the link
        # at once (not at the next /tickle, 60 s away), with the earlier frame's message
        sim.expire_session()
        await wait_until(lambda: status.reconnects == 1, timeout=3, what="the link lost")
        assert status.last_error == "not authenticated: session expired"
        assert sim.ws_connects == 1 and len(requests_to(sim, "/tickle")) == 1  # no tickle yet


async def test_a_competing_login_is_not_fought(autojump_clock: trio.testing.MockClock) -> None:
    """Another login took the brokerage session: degraded with that reason, no websocket
    while it lasts, only the production backoff's /tickle to notice its end (about ten in
    two minutes, nothing that would take the session back), then connected again."""
    async with open_ibkr_sim(tick_interval=None) as sim:
        status = StreamStatus("ibkr")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(IbkrStream(sim.url, rest_min_interval=0.0).run, ListSink(), status)
            await wait_until(lambda: connected(status), what="connected")
            sim.compete()
            await wait_until(
                lambda: status.state is StreamState.DEGRADED and status.reason == COMPETING,
                what="degraded: competing",
            )
            since = len(sim.rest_log)
            await trio.sleep(120)
            asked = [path for _, path in sim.rest_log[since:]]
            assert set(asked) == {"/v1/api/tickle"} and 4 <= len(asked) <= 14, asked
            assert sim.ws_connects == 1 and status.reason == COMPETING
            sim.restore()
            await wait_until(lambda: connected(status), what="connected after the other login")
            nursery.cancel_scope.cancel()
