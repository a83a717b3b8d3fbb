"""Whether both simulators' clients have subscribed what a scenario is about to touch.

The fixture generator's fault schedule and the end-to-end benchmark both start only
then: a frame injected or a tick offered earlier would miss its client on a slow machine.
"""

from __future__ import annotations

from collections.abc import Collection

import trio

from greeksd.sim.ibkr_gateway import IbkrGatewaySim
from greeksd.sim.tastytrade_api import TastytradeSim


def subscribed(
    ib_sim: IbkrGatewaySim, tt_sim: TastytradeSim, conids: Collection[int], symbols: Collection[str]
) -> bool:
    """IBKR streams every conid in `conids`, and one authorized DXLink channel has the
    Greeks of every symbol in `symbols`."""
    if not set(conids) <= ib_sim.lines():
        return False
    wanted = set(symbols)
    return any(
        wanted <= {s for kind, s in channel.subscriptions if kind == "Greeks"}
        for conn in tt_sim.dxlink.connections.values()
        if conn.authorized
        for channel in conn.channels.values()
    )


async def wait_subscribed(
    ib_sim: IbkrGatewaySim, tt_sim: TastytradeSim, conids: Collection[int], symbols: Collection[str]
) -> None:
    # two simulators' state and no event that covers both: poll it
    while not subscribed(ib_sim, tt_sim, conids, symbols):  # noqa: ASYNC110
        await trio.sleep(0.01)
