"""The synthetic source: market ticks straight into the sink, no broker protocol.

It stands in for brokers where only the pipeline matters (the foundation demo, writer
and supervisor tests), and can be told to fail every N ticks to exercise restarts.
"""

from __future__ import annotations

from datetime import UTC, datetime

import trio

from greeksd.model import (
    Broker,
    Contract,
    Snapshot,
    SnapshotSink,
    StreamState,
    StreamStatus,
    future_root,
)
from greeksd.sim.market import SyntheticMarket, Tick


class SyntheticFailure(RuntimeError):
    """Raised on purpose by `fail_every`."""


class SyntheticSource:
    def __init__(
        self,
        market: SyntheticMarket,
        *,
        name: str = "synthetic",
        account_id: str = "SIM-1",
        ticks_per_second: float = 50.0,
        fail_every: int | None = None,
        max_ticks: int | None = None,
    ) -> None:
        self.name = name
        self.market = market
        self.account_id = account_id
        self.interval = 1.0 / ticks_per_second if ticks_per_second > 0 else 0.0
        self.fail_every = fail_every
        self.max_ticks = max_ticks
        self.ticks_sent = 0

    def snapshot(self, tick: Tick) -> Snapshot:
        c = tick.contract
        underlying = future_root(c.key.future) if c.key.future else c.underlying
        contract = Contract(c.key, underlying, c.multiplier, c.quantity, self.account_id)
        now = datetime.now(UTC)
        g = tick.greeks
        row = Snapshot.for_contract(
            Broker.SYNTHETIC,
            contract,
            event_time=now,
            received_at=now,
            delta=g.delta,
            gamma=g.gamma,
            theta=g.theta,
            vega=g.vega,
            rho=g.rho,
            implied_volatility=g.implied_volatility,
            underlying_price=tick.underlying_price,
            bid=tick.bid,
            ask=tick.ask,
            mark=g.price,
            source_payload={"seq": tick.seq, "source": self.name},
        )
        row.source = self.name
        return row

    async def run(self, sink: SnapshotSink, status: StreamStatus) -> None:
        status.subscriptions = len(self.market.contracts)
        status.set_state(StreamState.CONNECTED, None, now=datetime.now(UTC))
        next_at = trio.current_time()
        since_start = 0
        while self.max_ticks is None or self.ticks_sent < self.max_ticks:
            if self.fail_every and since_start and since_start % self.fail_every == 0:
                raise SyntheticFailure(f"failing on purpose after {since_start} ticks")
            tick = self.market.next_tick()
            sink.put(self.snapshot(tick))
            self.ticks_sent += 1
            since_start += 1
            status.ticks += 1
            status.last_message_at = datetime.now(UTC)
            next_at += self.interval
            await trio.sleep_until(next_at)
