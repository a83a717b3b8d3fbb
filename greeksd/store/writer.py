"""The writer: the only task that writes snapshots, on the only write connection.

Batches flush at `flush_rows` rows or `flush_ms` after the batch's first row; each is
one bounded attempt on the database (greeksd/store/snapshot_table.py: COPY, idempotent,
so any batch can be retried after any failure). The rest of greeksd only sees a
trio-native `run()`.

A database that hangs is an outage like one that refuses (greeksd/store/deadline.py):
every call is bounded, and once one failed a background probe decides when the database
takes writes again, so meanwhile every batch goes straight to the spool (where a batch
goes, and why rows wait in memory: greeksd/store/spool_policy.py). While older rows wait
in the spool, new batches are appended behind them (also during a drain, by a reader
beside it), so rows reach the table in the order they came.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import psycopg
import trio

from greeksd import config
from greeksd.backoff import Backoff
from greeksd.logs import get_logger
from greeksd.model import Snapshot, StreamState
from greeksd.store.deadline import UNREACHABLE
from greeksd.store.snapshot_table import CopyRows, SnapshotTable
from greeksd.store.spool import Spool, SpoolUnavailable
from greeksd.store.spool_policy import (
    BOTH_UNAVAILABLE,
    DATABASE_DOWN_NO_SPOOL,
    SPOOL_UNAVAILABLE_WHILE_DRAINING,
    SpoolPolicy,
)
from greeksd.store.writer_stats import WriterStats

log = get_logger("greeksd.writer")

SPOOL_RETRY_S = 1.0  # while a drain runs, how often arrivals retry an unavailable spool


class Writer:
    def __init__(
        self,
        url: str,
        *,
        flush_rows: int = config.FLUSH_ROWS,
        flush_ms: int = config.FLUSH_MS,
        slo_ms: int = config.LATENCY_SLO_MS,
        backoff: Backoff | None = None,
        connect: Callable[[str], psycopg.Connection] | None = None,
        spool: Spool | None = None,
        timeout_s: float = config.DB_TIMEOUT_S,
        schema_ready: trio.Event | None = None,
        instance: str | None = None,
        store_payload: bool = config.STORE_PAYLOAD,
    ) -> None:
        self.flush_rows = flush_rows
        # GREEKSD_STORE_PAYLOAD: off, a row's raw event is not stored (NULL), nor
        # spooled. The Connections skip building it then (greeksd.model.KEEP_PAYLOAD);
        # this is the guarantee for any row that comes with one anyway.
        self.store_payload = store_payload
        # Every row this writer stores names it (GREEKSD_INSTANCE), spooled rows too:
        # the instance that writes a row is the one whose spool held it.
        self.instance = instance
        self.flush_s = flush_ms / 1000.0
        self.slo_ms = slo_ms
        self._backoff = backoff or Backoff(initial=0.2, maximum=5.0)
        self._table = SnapshotTable(url, timeout_s, connect)
        self._spool = spool
        # Set once the table exists (the service migrates in the background when the
        # database is down at start); until then nothing is sent to the database.
        self._schema_ready = schema_ready
        self._nursery: trio.Nursery | None = None
        self._probing = False
        # The scope the writer waits in (for rows, or for its next attempt): the probe
        # cancels it once the database answers, so the writer resumes at once.
        self._idle: trio.CancelScope | None = None
        self._next_attempt = -math.inf
        self._last_slo_warning = -math.inf
        self._progress = trio.Event()
        self._newest: dict[tuple[str, str, str], datetime] = {}
        self._batch: list[Snapshot] = []
        self._batch_due = math.inf  # when self._batch is due, from its first row
        self._in_flight: Sequence[Snapshot] = ()
        self._receive: trio.MemoryReceiveChannel[Snapshot] | None = None
        self.stats = WriterStats()
        self._spools = SpoolPolicy(spool, self.stats)

    async def wait_settled(self, rows: int) -> None:
        """Return once `rows` rows have been committed or recognised as duplicates: how
        replay, shutdown and tests know that what they handed over is in the database."""
        while self.stats.rows_written + self.stats.duplicates < rows:
            await self._progress.wait()

    @property
    def spool_pending(self) -> bool:
        return self._spools.pending

    def backlog_reason(self) -> str:
        return self._spools.backlog_reason()

    def note_conflated(self) -> str:
        """The sink's `on_conflate` (see SpoolPolicy.note_conflated)."""
        return self._spools.note_conflated()

    async def run(self, receive: trio.MemoryReceiveChannel[Snapshot]) -> None:
        """Consume until the channel is closed and drained; every accepted row is
        committed (or, while the database is down, hung or not migrated yet, durably
        spooled) before this returns. A leftover spool from an earlier run is drained
        first; rows arriving meanwhile are appended behind it (see `_drain_spool`). The
        probe (`_probe`) runs in this task's nursery. Cancelling it abandons the current
        batch, so shut down by closing the channel instead."""
        self._receive = receive
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._spool is not None and not self._schema_is_ready():
                    self._start_probe()
                await self._consume(receive)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._table.close)

    async def _consume(self, receive: trio.MemoryReceiveChannel[Snapshot]) -> None:
        async with receive:
            if self.spool_pending and not self._held_off():
                await self._drain_spool()
            while True:
                # While a probe runs, it wakes this loop (cancels `_idle`) once the
                # database answers; otherwise the next retry is a point in time.
                retry = self._next_attempt if self.spool_pending and not self._probing else math.inf
                with trio.move_on_at(min(self._batch_due, retry)) as self._idle:
                    if len(self._batch) < self.flush_rows:  # (`_take_waiting` may fill it)
                        try:
                            self._add(await receive.receive())
                        except trio.EndOfChannel:
                            break
                        self._fill()
                        if len(self._batch) < self.flush_rows:
                            continue
                if self._batch:
                    await self._flush()
                elif self.spool_pending and not self._held_off():
                    await self._drain_spool()
            while self._batch:
                await self._flush()
            if self.spool_pending and not self._held_off():
                await self._drain_spool()  # one last try, so a healthy database ends up complete

    def _add(self, row: Snapshot) -> None:
        if not self._batch:
            self._batch_due = trio.current_time() + self.flush_s
        self._batch.append(row)

    def _fill(self) -> None:
        """Top the batch up with whatever already waits in the channel."""
        assert self._receive is not None
        while len(self._batch) < self.flush_rows:
            try:
                self._batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break

    async def _flush(self) -> None:
        batch, self._batch, self._batch_due = self._batch, [], math.inf
        self._in_flight = batch
        started = trio.current_time()
        try:
            await self.write_batch(batch)
        finally:
            self._in_flight = ()
        self._take_waiting(started)

    def _take_waiting(self, since: float) -> None:
        """Start the next batch with the rows that came while one was being written:
        its deadline counts from `since` (when that write began), the earliest any of
        them can have arrived, not from now. Counted from when the writer got back to
        them, a row that came just after a write began waited for the whole write and
        then `flush_ms` more (+10-15 ms of end-to-end p99 at 5,000 ticks/s)."""
        if self._batch or self._receive is None:
            return
        try:
            self._batch.append(self._receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        self._batch_due = since + self.flush_s
        self._fill()

    async def write_batch(self, batch: Sequence[Snapshot]) -> None:
        """Commit one batch, or spool it while the database is unreachable, hung or not
        migrated yet, or while older rows wait in the spool (behind them, so rows reach
        the table in the order they came). When neither database nor spool takes it
        (no spool configured, or the spool's disk refuses), hold it here, say why in
        `holding_reason`, and retry both until one does."""
        self.stats.rows_received += len(batch)
        self._count_late(batch)
        if not self.store_payload:
            for s in batch:
                s.source_payload = None
        rows = CopyRows(batch, self.instance)  # encoded in the COPY's thread
        while True:
            held_off = self._held_off()
            if self._spool is not None and (held_off or self.spool_pending):
                holding = BOTH_UNAVAILABLE if held_off else SPOOL_UNAVAILABLE_WHILE_DRAINING
                if self._spools.append(batch, holding):
                    if not held_off:
                        await self._drain_spool()
                    return
                # Held in memory. Once the spool is drained the batch may go straight in.
                if held_off or not await self._drain_spool():
                    await self._until_retry()
                    continue
            if self._schema_ready is not None and not self._schema_ready.is_set():
                self._spools.hold(DATABASE_DOWN_NO_SPOOL, len(batch))
                await self._schema_ready.wait()  # no spool: nowhere else for the rows
            started = time.perf_counter()
            try:
                inserted = await self._table.write(rows)
            except psycopg.Error as exc:
                self._on_failure(exc, len(rows))
                if self._spool is None:
                    self._spools.hold(DATABASE_DOWN_NO_SPOOL, len(batch))
                elif self._spools.append(batch, BOTH_UNAVAILABLE):
                    return
                await self._until_retry()
                continue
            self._on_success(batch, inserted, started)
            return

    def _retry_later(self) -> None:
        """The spool's disk (not the database) failed a drain: try again after backoff."""
        self._next_attempt = trio.current_time() + self._backoff.next_delay()

    async def _drain_spool(self) -> bool:
        """Replay the spool in order; True when nothing is left pending. Idempotent: rows
        that an interrupted earlier drain already committed come back as duplicates.

        A drain can be long (a big spool, a slow or hung database), so the channel is
        read beside it (`_spool_arrivals`): new rows are appended behind the spooled ones
        and drained in turn. They are on disk within one flush interval instead of
        waiting in memory, and rows still reach the table in arrival order."""
        assert self._spool is not None
        async with trio.open_nursery() as nursery:
            if self._receive is not None:
                nursery.start_soon(self._spool_arrivals)
            try:
                return await self._replay_spool()
            finally:
                nursery.cancel_scope.cancel()

    async def _replay_spool(self) -> bool:
        spool = self._spool
        assert spool is not None
        drained = 0
        while True:
            try:
                item = spool.next_pending()
            except SpoolUnavailable as exc:
                self._spools.failed(exc)
                self._retry_later()
                return False
            if item is None:
                break
            batch, end = item
            started = time.perf_counter()
            try:
                inserted = await self._table.write(CopyRows(batch, self.instance))
            except UNREACHABLE as exc:
                self._on_failure(exc, len(batch))
                return False
            except psycopg.Error as exc:
                if not self._spools.reject(batch, exc):
                    self._retry_later()
                    return False
            else:
                self._on_success(batch, inserted, started)
                drained += len(batch)
            try:
                spool.mark_drained(end)
            except SpoolUnavailable as exc:  # rows are in the database; the file stays
                self._spools.failed(exc)
            self.stats.spool_bytes = spool.size
        log.info("spool_drained", rows=drained)
        return True

    async def _spool_arrivals(self) -> None:
        """Beside a drain: keep batching rows from the channel and append each due batch
        (full, or past its flush deadline) behind the spool. Cancelled when the drain
        ends; an unfinished batch stays in `self._batch` for `run` to carry on with.
        When the spool cannot take them they wait in memory (retried every second)."""
        assert self._receive is not None
        closed = False
        while True:
            now = trio.current_time()
            if self._batch and (
                len(self._batch) >= self.flush_rows or closed or now >= self._batch_due
            ):
                chunk = self._batch[: self.flush_rows]
                if self._spools.append(chunk, holding=SPOOL_UNAVAILABLE_WHILE_DRAINING):
                    self.stats.rows_received += len(chunk)
                    self._count_late(chunk)
                    del self._batch[: len(chunk)]
                    if not self._batch:
                        self._batch_due = math.inf
                    continue
                await trio.sleep(SPOOL_RETRY_S)
                continue
            if closed:
                await trio.sleep_forever()
            with trio.move_on_at(self._batch_due):
                try:
                    self._add(await self._receive.receive())
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    closed = True
                    continue
                self._fill()

    def _on_success(self, batch: Sequence[Snapshot], inserted: int, started: float) -> None:
        committed = datetime.now(UTC)
        self._backoff.reset()
        self._next_attempt = -math.inf
        self._spools.release_hold()
        if self.stats.state is not StreamState.CONNECTED:
            log.info("writer_connected")
        self.stats.state = StreamState.CONNECTED
        self.stats.last_error = None
        self.stats.rows_written += inserted
        self.stats.duplicates += len(batch) - inserted
        self.stats.batches += 1
        self.stats.last_batch_rows = len(batch)
        self.stats.last_flush_ms = (time.perf_counter() - started) * 1000.0
        self._record_latency(batch, committed)
        self._progress.set()
        self._progress = trio.Event()

    def spool_unwritten_now(self, extra: Sequence[Snapshot] = ()) -> int:
        """Last resort before an immediate exit: spool the batch being built, whatever
        waits in the channel, and `extra` (the sink's overflow). Returns the rows saved.
        A batch already in flight may land in both places; the idempotent insert makes
        that harmless when the spool is drained."""
        if self._spool is None:
            return 0
        pending, self._batch = [*self._in_flight, *self._batch], []
        if self._receive is not None:
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                while True:
                    pending.append(self._receive.receive_nowait())
        pending.extend(extra)
        if not pending:
            return 0
        return len(pending) if self._spools.append(pending) else 0

    def _count_late(self, batch: Sequence[Snapshot]) -> None:
        """Out-of-order policy: an event older than the newest one already accepted for
        its contract is stored (queries order by event_time) and counted as late."""
        newest = self._newest
        for s in batch:
            key = (s.broker, s.account_id, s.contract_key)
            seen = newest.get(key)
            if seen is None or s.event_time >= seen:
                newest[key] = s.event_time
            else:
                self.stats.late += 1

    def _on_failure(self, exc: psycopg.Error, rows: int, event: str = "batch_write_failed") -> None:
        """A refusal, a broken connection or a timeout: degraded, retry after backoff.
        With a spool, a probe takes over deciding when the database is back, so the run
        loop spools every batch without waiting on the database meanwhile. (The thread
        that failed has closed its connection itself.)"""
        self.stats.failed_attempts += 1
        self.stats.state = StreamState.DEGRADED
        self.stats.last_error = f"{type(exc).__name__}: {str(exc).strip()}"
        delay = self._backoff.next_delay()
        self._next_attempt = trio.current_time() + delay
        log.error(
            event,
            rows=rows,
            attempt=self._backoff.attempts,
            retry_in_s=round(delay, 2),
            error=self.stats.last_error,
        )
        self._start_probe()

    def waiting_for_database(self, reason: str) -> None:
        """The schema cannot be applied yet (the service retries in the background):
        say so in the status until the database takes writes."""
        self.stats.state = StreamState.DEGRADED
        self.stats.last_error = f"waiting for database: {reason}"

    def _schema_is_ready(self) -> bool:
        return self._schema_ready is None or self._schema_ready.is_set()

    def _held_off(self) -> bool:
        """True while nothing may be sent to the database: before the schema exists,
        while a probe is in charge, or before the backoff has passed (after a database
        failure, or a spool disk failure during a drain)."""
        return (
            self._probing or not self._schema_is_ready() or trio.current_time() < self._next_attempt
        )

    async def _until_retry(self) -> None:
        """Wait for the next attempt, at least a short step (while a probe's attempt is
        in flight its verdict is not yet in `_next_attempt`, and this must not spin).
        The probe's verdict ends the wait early, like it wakes the idle run loop."""
        with trio.move_on_at(max(self._next_attempt, trio.current_time() + 0.05)) as self._idle:
            await trio.sleep_forever()

    def _start_probe(self) -> None:
        if self._spool is not None and self._nursery is not None and not self._probing:
            self._probing = True
            self._nursery.start_soon(self._probe)

    async def _probe(self) -> None:
        """In the background, find out when the database takes writes again: wait for the
        schema, then at the backoff pace take the lock a COPY needs (bounded like every
        call). Until then the run loop spools each batch at once; afterwards it drains."""
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        while True:
            await trio.sleep_until(self._next_attempt)
            # The verdict is due by then: the run loop's retry clock must not run out first.
            self._next_attempt = trio.current_time() + self._table.deadline_s
            try:
                await self._table.probe()
            except psycopg.Error as exc:
                self._on_failure(exc, 0, "database_still_unavailable")
                continue
            break
        self._probing = False
        self._next_attempt = -math.inf
        if self.stats.state is StreamState.DEGRADED:
            self.stats.state = StreamState.CONNECTING
            self.stats.last_error = None
        log.info("database_answering", spool_bytes=self.stats.spool_bytes)
        if self._idle is not None:
            self._idle.cancel()

    def _record_latency(self, batch: Sequence[Snapshot], committed: datetime) -> None:
        now_s = committed.timestamp()
        latencies = [(now_s - s.received_at.timestamp()) * 1000.0 for s in batch]
        self.stats.latency.record(latencies, now_s)
        p95 = self.stats.latency.percentiles(now_s, (0.95,))[0.95]
        if p95 is not None and p95 > self.slo_ms and now_s - self._last_slo_warning > 10.0:
            self._last_slo_warning = now_s
            log.warning(
                "latency_slo_exceeded", p95_ms=round(p95, 1), slo_ms=self.slo_ms, window_s=60
            )

    def _close(self) -> None:
        """Drop the connection (tests simulate a broken one this way)."""
        self._table.close()
