"""IbkrStream, GatewayClient and the probe against the simulated gateway over real TLS
sockets (no mocked sockets)."""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from greeksd.backoff import Backoff, url_address
from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.gateway import (
    GatewayClient,
    GatewayUnavailable,
    NoBridge,
    NotLoggedIn,
    PenaltyBox,
    client_ssl_context,
)
from greeksd.brokers.ibkr.probe import probe_ibkr
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.model import ContractKey, OptionRight, StreamState, StreamStatus
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import SimContract
from tests.helpers import ListSink, assert_reconnected_promptly, wait_until

OPTION_SMD = '+{"fields":["31","84","86","7308","7309","7310","7311","7633"]}'


@asynccontextmanager
async def running(
    sim: IbkrGatewaySim, **options: Any
) -> AsyncIterator[tuple[ListSink, StreamStatus]]:
    options = {"rest_min_interval": 0.0, "backoff": Backoff(initial=0.05, maximum=0.2), **options}
    stream = IbkrStream(sim.url, **options)
    sink, status = ListSink(), StreamStatus("ibkr")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run, sink, status)
        yield sink, status
        nursery.cancel_scope.cancel()


def sent_state(sim: IbkrGatewaySim, conid: int, until: int | None = None) -> dict[str, str]:
    """Every field the simulator sent for `conid` (before message `until`), merged in
    order: what a faithful client must hold."""
    merged: dict[str, str] = {}
    for tick in sim.sent_ticks[:until]:
        if tick.conid == conid:
            merged.update(tick.fields)
    return {k: v for k, v in merged.items() if v not in ("", "N/A")}


def connected(status: StreamStatus) -> bool:
    return status.state is StreamState.CONNECTED


async def test_handshake_subscribe_and_greeks_equal_the_simulators() -> None:
    async with open_ibkr_sim(tick_interval=None) as sim, running(sim) as (sink, status):
        # The stream subscribes before it reports CONNECTED: wait for both, not one.
        await wait_until(
            lambda: len(sim.lines()) == 13 and connected(status),
            what="8 options + 5 underlyings, then connected",
        )
        assert sim.logins == ["cookie"]
        commands = [text for _, text in sim.received]
        assert sorted(commands[:8]) == sorted(f"smd+{c}{OPTION_SMD}" for c in sim.conids.values())
        assert sorted(commands[8:13]) == sorted(
            f'smd+{c}+{{"fields":["31"]}}' for c in {265598, 756733, 416904, 272093, 320227}
        )
        for _ in range(3 * len(sim.market.contracts)):  # prices first, Greeks after
            sim.tick()

        def caught_up() -> bool:
            return all(
                (s := sink.latest(str(k))) is not None
                and {k: v for k, v in (s.source_payload or {}).items() if k[0] != "6"}
                == sent_state(sim, c)
                for k, c in sim.conids.items()
            )

        await wait_until(caught_up, what="every option's latest snapshot = sent values")
        for contract in sim.market.contracts:
            snap = sink.latest(str(contract.key))
            assert snap is not None
            sent = sent_state(sim, sim.conid_of(contract.key))
            last_sent = max(i for i, t in enumerate(sim.sent_ticks) if t.key == contract.key)
            und = sent_state(sim, sim.underlying_conids[contract.underlying], last_sent)
            assert (snap.underlying, snap.expiration, snap.strike, snap.option_type) == (
                contract.underlying,
                contract.key.expiration,
                contract.key.strike,
                contract.key.right,
            )
            assert (snap.quantity, snap.multiplier, snap.account_id) == (
                contract.quantity,
                contract.multiplier,
                sim.account,
            )
            assert snap.delta == float(sent["7308"]) and snap.gamma == float(sent["7309"])
            assert snap.theta == float(sent["7310"]) and snap.vega == float(sent["7311"])
            assert snap.implied_volatility == pytest.approx(float(sent["7633"][:-1]) / 100)
            assert snap.rho is None
            assert (snap.bid, snap.ask, snap.last) == (
                float(sent["84"]),
                float(sent["86"]),
                float(sent["31"]),
            )
            assert snap.underlying_price == float(und["31"])
        spxw = [s for s in sink.rows if s.contract_key.startswith("SPXW ")]
        assert spxw and all(s.underlying == "SPX" for s in spxw)
        assert status.ticks == len(sink.rows) and status.rejected_frames == 0


async def test_bare_positions_are_completed_from_secdef() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, bare_positions=True) as sim,
        running(sim) as (sink, _status),
    ):
        keys = {str(k) for k in sim.conids}
        await wait_until(lambda: keys <= {s.contract_key for s in sink.rows}, what="all keys")
        assert any(path == "/v1/api/trsrv/secdef" for path in sim.rest_calls)


async def test_tic_every_heartbeat_interval_keeps_an_idle_link_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_ibkr_sim(tick_interval=None, heartbeat_s=10.0) as sim,
        running(sim, heartbeat_s=60.0, watchdog_s=30.0, tickle_s=60.0) as (_sink, status),
    ):
        await wait_until(lambda: connected(status), what="connected")
        start = trio.current_time()
        await trio.sleep(300)  # five heartbeat intervals, no market data at all
        tics = [at - start for at, text in sim.received if text == "tic"]
        assert len(tics) == 5
        gaps = [b - a for a, b in itertools.pairwise(tics)]
        assert all(gap == pytest.approx(60.0, abs=0.5) for gap in gaps), gaps
        assert connected(status) and status.reconnects == 0 and sim.ws_connects == 1
        tickles = sum(1 for path in sim.rest_calls if path == "/v1/api/tickle")
        assert tickles >= 5  # one at connect, then every ~60 s


async def test_dropped_connection_reconnects_resubscribes_and_ticks_resume() -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim, running(sim) as (sink, status):
        await wait_until(lambda: status.ticks > 20, what="first ticks")
        sim.drop_connections()
        await wait_until(lambda: sim.ws_connects == 2 and connected(status), what="reconnect")
        dropped_at = datetime.now(UTC)
        assert status.reconnects == 1
        conid = next(iter(sim.conids.values()))
        # `connected` is reported as the subscriptions are queued; they reach the
        # gateway in order right after, once per link
        await wait_until(
            lambda: sum(1 for _, t in sim.received if t == f"smd+{conid}{OPTION_SMD}") == 2,
            what="the option re-subscribed on the new link",
        )
        await wait_until(
            lambda: sum(s.received_at > dropped_at for s in sink.rows) > 20,
            what="ticks after the reconnect",
        )


async def test_session_expiry_degrades_then_reauthenticates() -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim, running(sim) as (sink, status):
        await wait_until(lambda: status.ticks > 10, what="first ticks")
        sim.expire_session()
        await wait_until(
            lambda: (
                status.state is StreamState.DEGRADED
                and (status.reason or "").startswith("not authenticated")
                and status.reconnects >= 3
            ),
            what="degraded, retrying",
        )
        assert sim.ws_connects == 1  # no websocket while the session is gone
        sim.restore()
        await wait_until(lambda: connected(status), what="connected again")
        restored_at = datetime.now(UTC)
        await wait_until(
            lambda: any(s.received_at > restored_at for s in sink.rows), what="ticks after re-auth"
        )


async def test_positions_opened_and_closed_are_subscribed_and_unsubscribed() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01) as sim,
        running(sim, positions_refresh_s=0.1) as (sink, status),
    ):
        await wait_until(
            lambda: connected(status) and status.subscriptions == 13, what="subscribed"
        )
        key = ContractKey(
            "AAPL", sim.market.as_of + timedelta(days=30), OptionRight.PUT, Decimal("185")
        )
        conid = sim.open_position(SimContract(key, "AAPL", Decimal(100), Decimal(-4)))
        await wait_until(lambda: sink.latest(str(key)) is not None, what="new position ticks")
        assert status.subscriptions == 14
        sim.close_position(key)
        await wait_until(
            lambda: any(t == f"umd+{conid}+{{}}" for _, t in sim.received),
            what="umd for the closed position",
        )
        assert status.subscriptions == 13 and conid not in sim.lines()


async def test_smd_is_renewed_before_the_expiry_so_data_keeps_flowing() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, smd_expiry_s=1.0) as sim,
        running(sim, smd_refresh_s=0.4) as (sink, status),
    ):
        await wait_until(lambda: connected(status), what="connected")
        since = datetime.now(UTC) + timedelta(seconds=2.5)
        await wait_until(
            lambda: sum(s.received_at > since for s in sink.rows) > 10,
            what="ticks 2.5 expiries after subscribing",
        )
        conid = next(iter(sim.conids.values()))
        assert sum(1 for _, t in sim.received if t == f"smd+{conid}{OPTION_SMD}") >= 5
        assert sim.ws_connects == 1


async def test_without_renewal_the_simulator_ends_the_stream() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, smd_expiry_s=0.5) as sim,
        running(sim, smd_refresh_s=3600) as (sink, status),
    ):
        await wait_until(lambda: status.ticks > 0, what="first ticks")
        await wait_until(lambda: not sim.lines(), what="every smd stream expired")
        count, seq = len(sink.rows), sim.market_ticks
        await wait_until(lambda: sim.market_ticks > seq + 50, what="50 more market ticks")
        assert len(sink.rows) == count


async def test_max_lines_subscribes_by_size_and_reports_what_was_left_out() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, max_lines=4) as sim,
        running(sim, max_lines=4) as (sink, status),
    ):
        ranked = sorted(sim.market.contracts, key=lambda c: (-abs(c.quantity), str(c.key)))
        kept, left = {str(c.key) for c in ranked[:4]}, [str(c.key) for c in ranked[4:]]
        await wait_until(lambda: kept <= {s.contract_key for s in sink.rows}, what="top 4")
        assert status.counters.left_out == left
        assert status.subscriptions == 4 and not sim.ignored_subscriptions
        assert {s.contract_key for s in sink.rows} == kept


async def test_malformed_frames_are_counted_and_the_stream_goes_on() -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim, running(sim) as (_sink, status):
        await wait_until(lambda: status.ticks > 5, what="first ticks")
        sim.send_malformed()
        await wait_until(lambda: status.rejected_frames == 5, what="5 rejected frames")
        ticks = status.ticks
        await wait_until(lambda: status.ticks > ticks + 10, what="ticks after bad frames")
        assert connected(status) and sim.ws_connects == 1


async def test_stalled_gateway_trips_the_watchdog_and_refused_upgrade_degrades() -> None:
    async with (
        open_ibkr_sim(tick_interval=None, heartbeat_s=0.1) as sim,
        running(sim, watchdog_s=0.6) as (_sink, status),
    ):
        await wait_until(lambda: connected(status), what="connected")
        sim.stall()
        sim.refuse_websocket()
        await wait_until(lambda: "watchdog" in (status.last_error or ""), what="watchdog")
        await wait_until(
            lambda: "upgrade refused (HTTP 401)" in (status.last_error or ""),
            what="refused upgrade reported",
        )
        assert status.state is StreamState.DEGRADED
        sim.restore()
        await wait_until(lambda: connected(status), what="connected after restore")
        assert sim.ws_connects == 2


def tickles(sim: IbkrGatewaySim) -> int:
    return sum(1 for path in sim.rest_calls if path == "/v1/api/tickle")


async def test_gateway_back_after_a_long_outage_is_reconnected_within_5s_without_hammering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A real outage (the listening socket closed, a new gateway on the same port two
    virtual minutes later) with the production backoff, which alone would have grown
    to ~30 s: the stream probes instead, so it is back within seconds of the gateway."""
    outage_s = 120.0
    status = StreamStatus("ibkr")
    async with trio.open_nursery() as nursery:
        async with open_ibkr_sim(tick_interval=None) as sim:
            stream = IbkrStream(sim.url, rest_min_interval=0.0)  # default backoff
            nursery.start_soon(stream.run, ListSink(), status)
            await wait_until(lambda: connected(status), what="connected")
        await wait_until(lambda: status.state is StreamState.DEGRADED, what="link lost")
        probes, reconnects = status.reachability_probes, status.reconnects
        await trio.sleep(outage_s)
        probes = status.reachability_probes - probes
        reconnects = status.reconnects - reconnects
        async with open_ibkr_sim(tick_interval=None, port=url_address(sim.url)[1]) as back:
            back_at = trio.current_time()
            await wait_until(lambda: connected(status), what="connected to the new gateway")
            took = trio.current_time() - back_at
            assert tickles(back) == 1  # probes are TCP connects: one attempt, one tickle
        nursery.cancel_scope.cancel()
    assert_reconnected_promptly(took, probes, reconnects, outage_s)


async def test_a_gateway_that_answers_but_refuses_still_gets_the_long_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_ibkr_sim(tick_interval=None) as sim:
        stream = IbkrStream(sim.url, rest_min_interval=0.0)  # default backoff
        status = StreamStatus("ibkr")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.run, ListSink(), status)
            await wait_until(lambda: connected(status), what="connected")
            sim.expire_session()
            start = tickles(sim)
            await trio.sleep(120)
            nursery.cancel_scope.cancel()
    attempts = tickles(sim) - start
    # backoff 0.5 s doubling to 30 s: about ten attempts in two minutes, not sixty
    assert 4 <= attempts <= 14, attempts
    assert status.state is StreamState.DEGRADED and "not authenticated" in (status.reason or "")


async def test_simulator_accepts_legacy_and_cookieless_sockets() -> None:
    async with open_ibkr_sim(tick_interval=None) as sim, GatewayClient(sim.url) as gw:
        session = (await gw.tickle()).session
        async with open_websocket_url(gw.ws_url, ssl_context=gw.ssl_context) as ws:
            assert p.parse_frame(await ws.get_message()) == p.WaitingForSession()
            await ws.send_message(p.frame({"session": session}))
            assert isinstance(p.parse_frame(await ws.get_message()), p.LoggedIn)
            await ws.send_message("xyz+1+{}")
            events = [p.parse_frame(await ws.get_message()) for _ in range(3)]
            assert isinstance(events[-1], p.GatewayErrorMessage)
            assert events[-1].message.startswith("Topic unknown") and events[-1].code == 1
        async with open_websocket_url(gw.ws_url, ssl_context=gw.ssl_context) as ws:
            await ws.get_message()
            await ws.send_message(p.ECHO_HB)
            events = [p.parse_frame(await ws.get_message()) for _ in range(4)]
            assert events[-1] == p.Echo()
        assert sim.logins == ["legacy", "cookieless"]


async def test_gateway_preflight_and_tls() -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim:
        async with GatewayClient(sim.url, min_interval=0.0) as gw:
            await gw.iserver_accounts()
            await wait_until(lambda: sim.market_ticks > 8, what="every contract priced")
            conid = next(iter(sim.conids.values()))
            first = await gw.snapshot([conid], ["31", "7308", "6509"])
            assert first == [{"conid": conid, "conidEx": str(conid)}]
            second = await gw.snapshot([conid], ["31", "7308", "6509"])
            assert second[0]["6509"] == "RpB" and "31" in second[0]
        async with GatewayClient(sim.url, verify_tls=True) as strict:
            with pytest.raises(GatewayUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await strict.tickle()
        async with GatewayClient(sim.url, ca_file=sim.ca_file) as pinned:
            assert pinned.ssl_context.verify_mode.name == "CERT_REQUIRED"
            assert (await pinned.tickle()).session
    remote = client_ssl_context("https://gateway.example:5000", ca_file=None, verify_tls=False)
    assert remote.check_hostname


PENALTY = r"gateway penalty box until \d\d:\d\d:\d\d UTC"


async def test_a_429_is_a_penalty_box_nothing_is_sent_until_it_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_ibkr_sim(tick_interval=None) as sim, GatewayClient(sim.url) as gw:
        sim.throttle(1)  # one 429 without Retry-After
        with pytest.raises(PenaltyBox, match=PENALTY):
            await gw.auth_status()
        sent = len(sim.rest_calls)
        for wait in (0.0, 300.0, 299.0):  # 599 s into IBKR's ~10-minute box
            await trio.sleep(wait)
            with pytest.raises(PenaltyBox, match=PENALTY):
                await gw.tickle()
        assert len(sim.rest_calls) == sent, "a request reached the gateway in the penalty box"
        await trio.sleep(1.0)
        assert (await gw.tickle()).session and len(sim.rest_calls) == sent + 1


async def test_a_429_with_retry_after_is_waited_out_for_that_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_ibkr_sim(
            tick_interval=None, pacing=True, penalty_s=30, penalty_retry_after=True
        ) as sim,
        GatewayClient(sim.url, min_interval=0.0) as gw,  # pacing off: it will burst
    ):
        await gw.tickle()
        with pytest.raises(PenaltyBox, match=PENALTY):
            await gw.tickle()  # the second within 1 s: over IBKR's /tickle limit
        assert gw.penalty_remaining() == pytest.approx(30.0)
        assert len(sim.pacing_violations) == 1
        await trio.sleep(29.9)
        with pytest.raises(PenaltyBox):
            await gw.tickle()
        await trio.sleep(0.1)
        assert (await gw.tickle()).session
    assert sim.penalized_requests == 0  # nothing was sent inside the box


async def test_logged_out_and_bridgeless_gateways_raise_what_to_do() -> None:
    async with (
        open_ibkr_sim(tick_interval=None) as sim,
        GatewayClient(sim.url, min_interval=0) as gw,
    ):
        sim.log_out()
        with pytest.raises(NotLoggedIn) as logged_out:
            await gw.tickle()
        assert logged_out.value.reason == f"gateway not logged in: open {sim.url} and log in"
        sim.restore()
        sim.drop_bridge()
        with pytest.raises(NoBridge) as no_bridge:
            await gw.iserver_accounts()
        assert no_bridge.value.reason == (
            "no bridge: the gateway has no brokerage session (GET /iserver/accounts "
            f'answered 400 "no bridge"); log in again at {sim.url}'
        )


def requests_to(sim: IbkrGatewaySim, path: str) -> list[float]:
    """When (trio time) the simulator received each request for `path`."""
    return [at for at, got in sim.rest_log if got == f"/v1/api{path}"]


def penalized(status: StreamStatus) -> bool:
    return status.state is StreamState.DEGRADED and bool(re.fullmatch(PENALTY, status.reason or ""))


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "control-unpaced"])
async def test_the_client_keeps_ibkrs_pacing_or_the_gateway_boxes_it(
    paced: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """The simulator enforces IBKR's limits. Asked to tickle every 0.3 s and to refresh
    positions every 0.5 s, the client keeps to 1 /tickle per s, 1 /portfolio/accounts
    per 5 s and 10 requests per s; with its pacing off (the control) the gateway puts it
    in the penalty box, and the client then sends nothing at all."""
    async with open_ibkr_sim(tick_interval=None, pacing=True) as sim:
        options: dict[str, Any] = {"rest_min_interval": 0.1 if paced else 0.0}
        async with running(sim, tickle_s=0.3, positions_refresh_s=0.5, **options) as (_, status):
            await trio.sleep(60)
            if paced:
                assert sim.pacing_violations == [] and connected(status)
            else:
                assert sim.pacing_violations and penalized(status)
                assert status.counters.penalty_box_until
    assert sim.penalized_requests == 0
    if not paced:
        return
    tickles, accounts = requests_to(sim, "/tickle"), requests_to(sim, "/portfolio/accounts")
    everything = [at for at, _ in sim.rest_log]
    assert 55 <= len(tickles) <= 61 and 10 <= len(accounts) <= 13  # at the limits, not idle
    assert min(b - a for a, b in itertools.pairwise(tickles)) >= 1.0 - 1e-9
    assert min(b - a for a, b in itertools.pairwise(accounts)) >= 5.0 - 1e-9
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(everything, everything[10:], strict=False))


async def test_a_penalty_box_at_connect_is_waited_out_then_the_stream_connects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_ibkr_sim(tick_interval=None) as sim:
        sim.throttle(1)  # the first request, the connect's /tickle, gets a 429
        async with running(sim) as (_sink, status):
            await wait_until(lambda: penalized(status), what="degraded: penalty box")
            ((refused_at, _),) = sim.rest_log
            await trio.sleep(refused_at + 599 - trio.current_time())
            assert penalized(status) and len(sim.rest_log) == 1, "sent inside the box"
            await trio.sleep(2)
            await wait_until(lambda: connected(status), what="connected after the box")
            assert status.reconnects == 1 and status.counters.penalty_box_until is None
            assert requests_to(sim, "/tickle")[1] - refused_at >= 600.0 - 1e-6


async def test_a_penalty_box_on_a_live_link_keeps_streaming_and_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_ibkr_sim(tick_interval=None) as sim, running(sim) as (sink, status):
        await wait_until(lambda: connected(status), what="connected")
        sim.throttle(1)  # the next REST call (tickle or positions, at ~60 s) gets a 429
        await trio.sleep(61)
        assert penalized(status) and status.counters.penalty_box_until, (status, sim.rest_log)
        refused_at = max(at for at, _ in sim.rest_log)
        rows = len(sink.rows)
        for _ in range(2 * len(sim.market.contracts)):
            sim.tick()
        await wait_until(lambda: len(sink.rows) > rows, what="rows inside the penalty box")
        await trio.sleep(refused_at + 599 - trio.current_time())
        assert max(at for at, _ in sim.rest_log) == refused_at, "sent inside the box"
        await trio.sleep(70)  # the box is over, the next tickle answers
        assert connected(status) and status.counters.penalty_box_until is None
        assert status.reconnects == 0 and sim.ws_connects == 1


async def test_probe_writes_coverage_and_succeeds(tmp_path: Path) -> None:
    async with open_ibkr_sim(tick_interval=0.01) as sim:
        code = await probe_ibkr(sim.url, duration_s=1.5, out_dir=tmp_path, rest_min_interval=0.0)
    summary = json.loads((tmp_path / "ibkr-probe.json").read_text())
    rows = list(csv.DictReader((tmp_path / "ibkr-probe-coverage.csv").open()))
    assert code == 0, summary
    assert summary["contracts_with_greeks"] == summary["contracts"] == 8
    assert (summary["coverage"]["subscribed"], summary["coverage"]["fresh"]) == (8, 8)
    assert summary["connect_ms"] > 0 and summary["first_message_ms"] > 0
    assert {r["contract_key"] for r in rows} == {str(k) for k in sim.conids}
    assert all(r["delta"] == "True" and r["implied_volatility"] == "True" for r in rows)
    assert all(float(r["first_greeks_ms"]) > 0 for r in rows)
    assert all(v["6509"] == "RpB" for v in summary["preflight"].values())
    assert summary["market_data"] == {"live": 8, "delayed": 0, "frozen": 0, "unknown": 0}
    assert all(r["market_data"] == "live" for r in rows)
    assert not any("delayed or frozen" in h for h in summary["hints"])


async def test_probe_reports_delayed_data_as_not_live(tmp_path: Path) -> None:
    async with open_ibkr_sim(tick_interval=0.01, availability="DpB") as sim:
        code = await probe_ibkr(sim.url, duration_s=1.5, out_dir=tmp_path, rest_min_interval=0.0)
    summary = json.loads((tmp_path / "ibkr-probe.json").read_text())
    rows = list(csv.DictReader((tmp_path / "ibkr-probe-coverage.csv").open()))
    assert code == 0, summary  # Greeks arrive, delayed
    assert summary["market_data"] == {"live": 0, "delayed": 8, "frozen": 0, "unknown": 0}
    assert {(r["availability"], r["market_data"]) for r in rows} == {("DpB", "delayed")}
    assert any(h.startswith("8 contract(s) get delayed or frozen") for h in summary["hints"])


@pytest.mark.parametrize(
    ("fault", "hint"),
    [
        ("lines", "lines limit"),
        ("expired", "not authenticated"),
    ],
)
async def test_probe_zero_coverage_exits_1_with_a_hint(
    tmp_path: Path,
    fault: str,
    hint: str,
) -> None:
    async with open_ibkr_sim(tick_interval=0.01, max_lines=0) as sim:
        if fault == "expired":
            sim.expire_session()
        code = await probe_ibkr(sim.url, duration_s=0.5, out_dir=tmp_path, rest_min_interval=0.0)
    summary = json.loads((tmp_path / "ibkr-probe.json").read_text())
    assert code == 1
    assert summary["contracts_with_greeks"] == 0
    assert summary["coverage"]["fresh"] == 0
    assert any(hint in h for h in summary["hints"]), summary["hints"]
