"""The one road from sources to the writer: a bounded trio memory channel.

`put` never blocks a websocket reader. When the channel is full, rows wait in an
overflow map keyed by (broker, account, contract) that keeps only the newest row per
contract (conflation, counted), and a pump task feeds them to the channel in order as
room frees up. Memory stays bounded by channel size + number of contracts.

Trades take a separate small channel to their own writer: they are rare, must never be
conflated, and must not wait behind a backlog of Greeks rows. A full trade channel means
the trade writer has been stuck for thousands of fills: counted and logged as an error.

Conflation is loud: each conflated row is reported to `on_conflate` (the writer, which
counts it under the reason the channel is full, e.g. "database and spool both
unavailable") and an error line with that reason is logged at most every few seconds.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from greeksd.logs import get_logger
from greeksd.model import Snapshot, Trade

log = get_logger("greeksd.sink")

CONFLATION_LOG_EVERY_S = 5.0


class ChannelSink:
    def __init__(
        self,
        send_channel: trio.MemorySendChannel[Snapshot],
        trade_channel: trio.MemorySendChannel[Trade] | None = None,
        *,
        on_conflate: Callable[[], str] | None = None,
    ) -> None:
        self._send = send_channel
        self._trades = trade_channel
        self.trades_accepted = 0
        self.trades_dropped = 0
        self._overflow: OrderedDict[tuple[str, str, str], Snapshot] = OrderedDict()
        self._wakeup = trio.Event()
        self._closed = False
        self.accepted = 0
        self.conflated = 0
        self._on_conflate = on_conflate
        self._last_conflation_log = -math.inf
        self._conflated_unlogged = 0

    def put(self, snapshot: Snapshot) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the sink is closed: greeksd is shutting down")
        self.accepted += 1
        if not self._overflow:
            try:
                self._send.send_nowait(snapshot)
                return
            except trio.WouldBlock:
                log.warning("channel_full_conflating", queue=self.queue_depth)
        key = snapshot.conflation_key()
        if key in self._overflow:
            self._conflate()
        self._overflow[key] = snapshot
        self._wakeup.set()

    def _conflate(self) -> None:
        self.conflated += 1
        self._conflated_unlogged += 1
        reason = self._on_conflate() if self._on_conflate is not None else "channel full"
        now = time.monotonic()
        if now - self._last_conflation_log >= CONFLATION_LOG_EVERY_S:
            self._last_conflation_log = now
            log.error(
                "rows_conflated",
                reason=reason,
                since_last_log=self._conflated_unlogged,
                conflated=self.conflated,
                queue=self.queue_depth,
            )
            self._conflated_unlogged = 0

    def put_trade(self, trade: Trade) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the sink is closed: greeksd is shutting down")
        try:
            if self._trades is None:
                raise trio.WouldBlock
            self._trades.send_nowait(trade)
        except trio.WouldBlock:
            self.trades_dropped += 1
            log.error(
                "trade_dropped",
                reason="no trade writer" if self._trades is None else "trade channel full",
                broker=trade.broker,
                broker_trade_id=trade.broker_trade_id,
                dropped=self.trades_dropped,
            )
            return
        self.trades_accepted += 1

    @property
    def queue_depth(self) -> int:
        return self._send.statistics().current_buffer_used + len(self._overflow)

    @property
    def overflow_size(self) -> int:
        return len(self._overflow)

    async def pump_overflow(self) -> None:
        """Runs for the sink's lifetime; returns after `close` once overflow is empty."""
        while True:
            if not self._overflow:
                if self._closed:
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            _, snapshot = self._overflow.popitem(last=False)
            await self._send.send(snapshot)

    def take_overflow(self) -> list[Snapshot]:
        """Hand over (and forget) the rows waiting for room: for an emergency spool."""
        rows = list(self._overflow.values())
        self._overflow.clear()
        return rows

    def close(self) -> None:
        """No more puts; the pump drains what is left, then the channel closes."""
        self._closed = True
        self._wakeup.set()
