"""Coverage over real sockets: each simulator fault => the stream's state, reason and
coverage counts; and through the service's API (/v1/coverage, status, /metrics)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.coverage import Coverage
from greeksd.model import Source, StreamState, StreamStatus
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from tests.api_harness import open_api
from tests.helpers import ListSink, wait_until

STALE_S = 1.0


def ibkr_stream(sim: IbkrGatewaySim) -> IbkrStream:
    return IbkrStream(sim.url, rest_min_interval=0.0, backoff=Backoff(0.05, 0.2))


@asynccontextmanager
async def running(source: Source, name: str) -> AsyncIterator[StreamStatus]:
    status = StreamStatus(name, coverage=Coverage(name, STALE_S))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run, ListSink(), status)
        yield status
        nursery.cancel_scope.cancel()


def degraded_with(status: StreamStatus, text: str) -> bool:
    return status.state is StreamState.DEGRADED and text in (status.reason or "")


def counts(status: StreamStatus) -> dict[str, Any]:
    assert status.coverage is not None
    return status.coverage.summary(datetime.now(UTC))


async def test_ibkr_gateway_ignoring_every_line_degrades_with_no_smd_data() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, max_lines=0, heartbeat_s=0.1) as sim,
        running(ibkr_stream(sim), "ibkr") as status,
    ):
        await wait_until(lambda: status.state is StreamState.CONNECTED, what="link up")
        assert status.coverage_reason is None
        await wait_until(
            lambda: degraded_with(status, "link alive, no Greeks: no smd data for 8 of 8"),
            what="degraded by coverage",
        )
        assert counts(status)["never"] == 8
        assert sim.ignored_subscriptions  # the gateway did ignore them


async def test_ibkr_partial_line_limit_is_reported_without_degrading() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, max_lines=5, heartbeat_s=0.1) as sim,
        running(ibkr_stream(sim), "ibkr") as status,
    ):
        await wait_until(
            lambda: status.coverage_reason == "no smd data for 3 of 8 contracts",
            what="partial coverage named",
        )
        assert status.state is StreamState.CONNECTED
        summary = counts(status)
        assert (summary["fresh"], summary["never"]) == (5, 3)


async def test_ibkr_greeks_withheld_while_prices_go_on_degrades_then_recovers() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, heartbeat_s=0.1) as sim,
        running(ibkr_stream(sim), "ibkr") as status,
    ):
        await wait_until(lambda: counts(status)["fresh"] == 8, what="all fresh")
        sim.apply_fault("withhold_greeks")
        await wait_until(
            lambda: degraded_with(status, "link alive, no Greeks: prices but no Greeks for 8 of 8"),
            what="degraded: prices but no Greeks",
        )
        assert counts(status)["stale"] == 8
        sim.apply_fault("restore")
        await wait_until(lambda: status.state is StreamState.CONNECTED, what="recovered")


async def test_ibkr_delayed_data_only_degrades() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, heartbeat_s=0.1, availability="DpB") as sim,
        running(ibkr_stream(sim), "ibkr") as status,
    ):
        await wait_until(
            lambda: degraded_with(status, "link alive, no Greeks: delayed data only"),
            what="degraded: delayed only",
        )
        assert counts(status)["delayed"] == 8


async def test_ibkr_stalled_gateway_is_link_silent() -> None:
    async with (
        open_ibkr_sim(tick_interval=0.01, heartbeat_s=0.1) as sim,
        running(ibkr_stream(sim), "ibkr") as status,
    ):
        await wait_until(lambda: counts(status)["fresh"] == 8, what="all fresh")
        sim.apply_fault("stall")
        await wait_until(lambda: degraded_with(status, "link silent"), what="link silent")


async def test_dxlink_refused_channel_degrades_naming_the_refusal_and_no_greeks() -> None:
    book = default_contracts(date.today(), 3)
    async with open_tastytrade_sim(contracts=book, keepalive_timeout=0.5) as sim:
        sim.dxlink.channel_refusal = "error"
        api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
        async with running(TastytradeStream(api), "tastytrade") as status:
            await wait_until(
                lambda: degraded_with(status, "link alive, no Greeks: no feed data for 3 of 3"),
                what="degraded by coverage",
            )
            assert "refused" in (status.reason or "")


async def test_dxlink_greeks_withheld_degrade_while_quotes_go_on() -> None:
    async with open_tastytrade_sim(keepalive_timeout=0.5, tick_interval=0.02) as sim:
        api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
        async with running(TastytradeStream(api), "tastytrade") as status:
            total = len(sim.dxlink.market.contracts)
            await wait_until(lambda: counts(status)["fresh"] == total, what="all fresh")
            sim.dxlink.greeks_withheld = {str(c.key) for c in sim.dxlink.market.contracts}
            await wait_until(
                lambda: degraded_with(status, "link alive, no Greeks"), what="degraded"
            )
            assert counts(status)["stale"] == total


async def test_coverage_api_status_and_gauges(db_url: str, tmp_path: Path) -> None:
    async with open_ibkr_sim(tick_interval=0.01, max_lines=5, heartbeat_s=0.1) as sim:
        sources = [ibkr_stream(sim)]
        async with open_api(
            db_url, tmp_path, sources=sources, settings_env={"GREEKSD_STALE_S": str(STALE_S)}
        ) as api:
            status = api.state.supervisor.registry["ibkr"]
            await wait_until(
                lambda: status.coverage_reason == "no smd data for 3 of 8 contracts",
                what="partial coverage",
            )
            code, body = await api.get_json("/v1/coverage")
            assert code == 200
            assert body["stale_s"] == STALE_S
            summary = body["sources"]["ibkr"]
            assert (summary["subscribed"], summary["fresh"], summary["never"]) == (8, 5, 3)
            assert len(body["contracts"]) == 8
            keys = [(c["broker"], c["contract_key"]) for c in body["contracts"]]
            assert keys == sorted(keys)
            code, never = await api.get_json("/v1/coverage", state="never", broker="ibkr")
            assert code == 200
            assert {c["state"] for c in never["contracts"]} == {"never"}
            assert len(never["contracts"]) == 3
            assert all(c["last_greeks_at"] is None for c in never["contracts"])
            for bad in ({"state": "rotten"}, {"broker": "nope"}, {"colour": "red"}):
                code, error = await api.get_json("/v1/coverage", **bad)
                assert code == 400, bad
                assert error["detail"]
            code, full = await api.get_json("/v1/streaming/status")
            assert full["streams"]["ibkr"]["coverage"]["never"] == 3
            assert full["streams"]["ibkr"]["state"] == "connected"
            response = await api.client.get("/metrics")
            text = await response.get_data(as_text=True)
            assert 'greeksd_contracts{broker="ibkr",state="never"} 3' in text
            for state in ("fresh", "stale", "delayed"):
                assert f'greeksd_contracts{{broker="ibkr",state="{state}"}}' in text
