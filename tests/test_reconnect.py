"""`Reconnect` in the Tastytrade stream: a real outage of both simulated servers (their
listening sockets closed), then new servers on the same ports. The IBKR twin of this
test, and the refused-gateway case, are in test_ibkr_stream.py."""

from __future__ import annotations

from datetime import date

import trio
import trio.testing

from greeksd.backoff import url_address
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.model import Snapshot, StreamState, StreamStatus, Trade
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import SIM_REFRESH, SIM_SECRET, open_tastytrade_sim
from tests.helpers import assert_reconnected_promptly, wait_until
from tests.test_service import _free_port


class NullSink:
    def put(self, snapshot: Snapshot) -> None:
        pass

    def put_trade(self, trade: Trade) -> None:
        pass


def connected(status: StreamStatus) -> bool:
    return status.state is StreamState.CONNECTED


async def test_tastytrade_back_after_a_long_outage_is_reconnected_within_5s(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02
    outage_s = 120.0
    contracts = default_contracts(date.today(), 1)
    status = StreamStatus("tastytrade")
    async with trio.open_nursery() as nursery:
        async with open_tastytrade_sim(contracts=contracts, tick_interval=0.5) as sim:
            api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
            stream = TastytradeStream(api, rest_url=sim.api_url)  # default backoff
            nursery.start_soon(stream.run, NullSink(), status)
            await wait_until(lambda: connected(status) and status.ticks > 0, what="rows")
            ports = url_address(sim.api_url)[1], url_address(sim.dxlink_url)[1]
        await wait_until(lambda: not connected(status), what="link lost")
        probes, reconnects = status.reachability_probes, status.reconnects
        await trio.sleep(outage_s)
        probes = status.reachability_probes - probes
        reconnects = status.reconnects - reconnects
        async with open_tastytrade_sim(
            contracts=contracts, tick_interval=0.5, port=ports[0], ws_port=ports[1]
        ) as back:
            back_at = trio.current_time()
            await wait_until(lambda: connected(status), what="connected to the new servers")
            took = trio.current_time() - back_at
            assert back.oauth_requests == 1  # the old access token was refused: one login
        nursery.cancel_scope.cancel()
    assert_reconnected_promptly(took, probes, reconnects, outage_s)


async def test_tastytrade_started_while_its_api_is_down_connects_within_5s_of_it_coming_up(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The first attempt fails at REST (nothing listens yet): the REST API is probed."""
    mock_clock.autojump_threshold = 0.02
    rest_port, ws_port = _free_port(), _free_port()
    rest_url = f"http://127.0.0.1:{rest_port}"
    status = StreamStatus("tastytrade")
    contracts = default_contracts(date.today(), 1)
    async with trio.open_nursery() as nursery:
        api = TastytradeApi(SIM_SECRET, SIM_REFRESH, api_url=rest_url)
        nursery.start_soon(TastytradeStream(api, rest_url=rest_url).run, NullSink(), status)
        await trio.sleep(60)
        assert "positions request failed" in (status.last_error or "")
        assert status.reconnects <= 1 and status.reachability_probes >= 29
        async with open_tastytrade_sim(
            contracts=contracts, tick_interval=0.5, port=rest_port, ws_port=ws_port
        ):
            up_at = trio.current_time()
            await wait_until(lambda: connected(status), what="connected once it is up")
            took = trio.current_time() - up_at
        nursery.cancel_scope.cancel()
    assert took <= 5.0, f"connected {took:.1f}s after the servers came up"
