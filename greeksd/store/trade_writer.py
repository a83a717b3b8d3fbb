"""The trades writer: executions from every broker into `trades`, on its own connection.

Trades are rare and precious, so this is simpler than the snapshot writer: no COPY, no
conflation, no spool. Whatever arrived together is one `insert_trades` transaction; the
table's (broker, broker_trade_id) key turns re-polled or re-sent fills into counted
duplicates, which is what makes blind retries safe. While the database is unreachable
the batch is retried with backoff (new fills queue in the bounded channel meanwhile); a
batch the database refuses for its content is retried trade by trade, so one bad fill is
set aside (counted, logged) without losing its neighbours. Every database call is
bounded like the snapshot writer's (greeksd/store/deadline.py), on a thread limiter of
its own, so a hung database is an outage here too, and nothing is sent before the schema
exists (a trade refused for a missing table would be set aside for good).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
import trio

from greeksd.backoff import Backoff
from greeksd.logs import get_logger
from greeksd.model import StreamState, Trade
from greeksd.store.deadline import (
    CLIENT_GRACE_S,
    UNREACHABLE,
    Link,
    Watch,
    call_bounded,
    with_timeouts,
)
from greeksd.store.trades import insert_trades

log = get_logger("greeksd.trade_writer")


@dataclass
class TradeWriterStats:
    state: StreamState = StreamState.CONNECTING
    last_error: str | None = None
    received: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    failed_attempts: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "last_error": self.last_error,
            "received": self.received,
            "written": self.written,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "batches": self.batches,
            "failed_attempts": self.failed_attempts,
        }


class TradeWriter:
    def __init__(
        self,
        url: str,
        *,
        batch_max: int = 500,
        backoff: Backoff | None = None,
        connect: Callable[[str], psycopg.Connection] | None = None,
        timeout_s: float = 5.0,
        schema_ready: trio.Event | None = None,
    ) -> None:
        self._url = with_timeouts(url, timeout_s)
        self.batch_max = batch_max
        self._backoff = backoff or Backoff(initial=0.2, maximum=5.0)
        self._connect = connect or (lambda u: psycopg.connect(u, autocommit=True))
        self._timeout_s = timeout_s
        self._limiter = trio.CapacityLimiter(1)
        self._schema_ready = schema_ready
        self._link: Link | None = None
        self._progress = trio.Event()
        self.stats = TradeWriterStats()

    async def wait_settled(self, trades: int) -> None:
        """Return once `trades` trades were stored, found already stored, or set aside."""
        stats = self.stats
        while stats.written + stats.duplicates + stats.rejected < trades:
            await self._progress.wait()

    async def run(self, receive: trio.MemoryReceiveChannel[Trade]) -> None:
        """Consume until the channel is closed and drained; every trade received is
        stored (or set aside as refused) before this returns."""
        try:
            async with receive:
                async for first in receive:
                    batch = [first]
                    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                        while len(batch) < self.batch_max:
                            batch.append(receive.receive_nowait())
                    await self.write(batch)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close)

    async def write(self, batch: Sequence[Trade]) -> None:
        self.stats.received += len(batch)
        await self._store(batch)

    async def _store(self, batch: Sequence[Trade]) -> None:
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        while True:
            try:
                inserted = await self._insert(batch)
            except UNREACHABLE as exc:
                await self._retry_later(exc, len(batch))
                continue
            except psycopg.Error as exc:
                if len(batch) == 1:
                    self._reject(batch[0], exc)
                    return
                for trade in batch:  # find the one the database refuses
                    await self._store([trade])
                return
            self._on_success(len(batch), inserted)
            return

    async def _retry_later(self, exc: psycopg.Error, trades: int) -> None:
        self.stats.failed_attempts += 1
        self.stats.state = StreamState.DEGRADED
        self.stats.last_error = f"{type(exc).__name__}: {str(exc).strip()}"
        delay = self._backoff.next_delay()
        log.error(
            "trades_write_failed",
            trades=trades,
            attempt=self._backoff.attempts,
            retry_in_s=round(delay, 2),
            error=self.stats.last_error,
        )
        await trio.sleep(delay)

    def _reject(self, trade: Trade, exc: psycopg.Error) -> None:
        self.stats.rejected += 1
        log.error(
            "trade_rejected",
            broker=trade.broker,
            broker_trade_id=trade.broker_trade_id,
            error=f"{type(exc).__name__}: {str(exc).strip()}",
        )
        self._wake()

    def _on_success(self, trades: int, inserted: int) -> None:
        self._backoff.reset()
        if self.stats.state is not StreamState.CONNECTED:
            log.info("trade_writer_connected")
        self.stats.state = StreamState.CONNECTED
        self.stats.last_error = None
        self.stats.written += inserted
        self.stats.duplicates += trades - inserted
        self.stats.batches += 1
        self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _insert(self, batch: Sequence[Trade]) -> int:
        """One bounded attempt; the worker thread owns the connection while it runs and
        closes it on any failure, so the next attempt connects afresh."""
        link, self._link = self._link, None
        link, inserted = await call_bounded(
            partial(self._insert_sync, link, batch),
            self._timeout_s + CLIENT_GRACE_S,
            self._limiter,
        )
        self._link = link
        return inserted

    def _insert_sync(
        self, link: Link | None, batch: Sequence[Trade], watch: Watch
    ) -> tuple[Link, int]:
        if link is not None and link.conn.closed:
            link.close()
            link = None
        if link is None:
            link = watch.open(self._connect, self._url, self._timeout_s)
        else:
            watch.use(link)
        try:
            return link, insert_trades(link.conn, batch)
        except BaseException:
            link.close()
            raise

    def _close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
