"""Whether the simulators' clients have subscribed what a scenario is about to touch.

The fixture generator's fault schedule and the end-to-end benchmark both start only
then: a frame injected or a tick offered earlier would miss its client on a slow machine.
Each simulator answers for itself (`subscribed`), in its own protocol's terms.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import trio

from greeksd.model import ContractKey


class Subscribable(Protocol):
    def subscribed(self, keys: Collection[ContractKey]) -> bool:
        """A client streams every one of these contracts from this simulator."""
        ...


async def wait_subscribed(sims: Sequence[Subscribable], keys: Collection[ContractKey]) -> None:
    """Until every simulator's client streams every contract in `keys`."""
    # several simulators' state and no event that covers them all: poll it
    while not all(sim.subscribed(keys) for sim in sims):  # noqa: ASYNC110
        await trio.sleep(0.01)
