"""The simulators as the end-to-end benchmark drives them (greeksd.brokers.spec.BenchSim):
silent until offered ticks, and able to say when each tick left.

IBKR rows: the simulator stamps `_updated` from the wall clock as it queues the frame,
and that is the row's event_time (ms resolution), so a row's latency is persisted_at -
event_time. DXLink rows: the simulator keeps each event's `time` strictly increasing
(+1 ms per event), which runs ahead of the clock at high rates, so the send wall time of
each (contract, time) is noted just before its frame is published.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Generic, Protocol, TypeVar

from greeksd.brokers.ibkr.spec import IbkrSettings
from greeksd.brokers.tastytrade.spec import TastytradeSettings
from greeksd.model import ContractKey
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import SimContract
from greeksd.sim.tastytrade_api import TastytradeSim, open_tastytrade_sim


class _Simulator(Protocol):
    account: str

    def subscribed(self, keys: Collection[ContractKey]) -> bool: ...


Sim = TypeVar("Sim", bound=_Simulator)
S = TypeVar("S")


class _BenchSim(Generic[Sim, S]):
    """What both brokers' bench simulators share: the simulator, the settings pointed at
    it, its subscription check and its account."""

    def __init__(self, sim: Sim, settings: S) -> None:
        self.sim = sim
        self._settings = settings

    @property
    def settings(self) -> S:
        return self._settings

    def subscribed(self, keys: Collection[ContractKey]) -> bool:
        return self.sim.subscribed(keys)

    def use_account(self, account: str) -> None:
        self.sim.account = account


class IbkrBenchSim(_BenchSim[IbkrGatewaySim, IbkrSettings]):
    async def offer(self, count: int) -> None:
        for _ in range(count):
            self.sim.tick()

    def sent(self) -> int:
        return sum(1 for t in self.sim.sent_ticks if t.key is not None)

    def dropped(self) -> int:
        return self.sim.dropped_ticks

    def latency_ms(self, contract_key: str, event_ms: int, persisted_s: float) -> float | None:
        return (persisted_s - event_ms / 1000) * 1000


@asynccontextmanager
async def open_ibkr(
    book: Sequence[SimContract], settings: IbkrSettings
) -> AsyncIterator[IbkrBenchSim]:
    async with open_ibkr_sim(book, tick_interval=None, heartbeat_s=3600.0) as sim:
        yield IbkrBenchSim(sim, replace(settings, url=sim.url))


class DxlinkBenchSim(_BenchSim[TastytradeSim, TastytradeSettings]):
    def __init__(self, sim: TastytradeSim, settings: TastytradeSettings) -> None:
        super().__init__(sim, settings)
        self.sent_at: dict[tuple[str, int], float] = {}
        """Send wall time (s) per (contract key, event time ms)."""

    async def offer(self, count: int) -> None:
        ticks = [self.sim.market.next_tick() for _ in range(count)]
        before = len(self.sim.sent_events)
        wall = time.time()
        await self.sim.dxlink.publish(ticks)
        for event in self.sim.sent_events[before:]:
            self.sent_at[(event.contract_key, event.time_ms)] = wall

    def sent(self) -> int:
        return len(self.sim.sent_events)

    def dropped(self) -> int:
        return 0

    def latency_ms(self, contract_key: str, event_ms: int, persisted_s: float) -> float | None:
        sent = self.sent_at.get((contract_key, event_ms))
        return None if sent is None else (persisted_s - sent) * 1000


@asynccontextmanager
async def open_dxlink(
    book: Sequence[SimContract], settings: TastytradeSettings
) -> AsyncIterator[DxlinkBenchSim]:
    async with open_tastytrade_sim(contracts=book, tick_interval=3600.0, nan_rho_rate=0.0) as sim:
        yield DxlinkBenchSim(
            sim,
            replace(settings, api_url=sim.api_url, secret=sim.secret, refresh=sim.refresh_token),
        )
