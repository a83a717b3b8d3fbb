"""The writer: the only task that writes snapshots, on the only write connection.

Batches flush at `flush_rows` rows or `flush_ms` after the batch's first row. Each
batch is one transaction of binary COPY straight into `greek_snapshots`. The unique index
on (broker, account, contract, event_time, fingerprint-of-values) refuses a batch that
holds a row already stored (a retry after an ambiguous commit, a replayed fixture, a
broker re-sending a tick); that batch is then written again through a temporary staging
table with `INSERT … SELECT … ON CONFLICT DO NOTHING`, which stores only the new rows.
So the common case costs one COPY, and any batch can be retried after any failure
without asking whether the previous attempt committed.

psycopg's sync API runs in a worker thread (trio.to_thread): measured faster than the
asyncio API through trio-asyncio (see greeksd/bench/writer_paths.py and the README), and
the rest of greeksd only sees a trio-native `run()`. The writer's threads take their own
`CapacityLimiter(1)`, never trio's default one that the API's reads share.

A database that hangs is an outage like one that refuses (greeksd/store/deadline.py):
every call is bounded, and once one failed a background probe decides when the database
takes writes again, so meanwhile every batch goes straight to the spool.

A spool whose disk refuses (full, read-only, I/O error) does not stop the writer either:
the batch waits in memory, the status says why (`holding_reason`), and the sink counts
what conflates under that reason. While older rows wait in the spool, new batches are
appended behind them (also during a drain, by a reader beside it), so rows reach the
table in the order they came.
"""

from __future__ import annotations

import contextlib
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import psycopg
import trio
from psycopg.types.json import Jsonb

from greeksd import config
from greeksd.backoff import Backoff
from greeksd.latency import LatencyHistogram
from greeksd.logs import get_logger
from greeksd.model import Snapshot, StreamState
from greeksd.store.deadline import CLIENT_GRACE_S, Link, Watch, call_bounded, with_timeouts
from greeksd.store.spool import (
    Spool,
    SpoolFull,
    SpoolUnavailable,
    append_durably,
    snapshot_to_dict,
)

log = get_logger("greeksd.writer")

# Why rows wait in memory (status `holding_reason`, the sink's conflation reason).
BOTH_UNAVAILABLE = "database and spool both unavailable"
DATABASE_DOWN_NO_SPOOL = "database unavailable and no spool configured"
SPOOL_UNAVAILABLE_WHILE_DRAINING = "spool unavailable while it drains"
WRITER_BEHIND = "writer behind the inflow"
SPOOL_LOG_EVERY_S = 5.0  # at most one spool-failure log line per this many seconds
SPOOL_RETRY_S = 1.0  # while a drain runs, how often arrivals retry an unavailable spool
SPOOL_PROBE_EVERY_S = 1.0  # while rows commit, how often an unavailable spool is re-checked
SPOOL_STATES = ("ok", "full", "unavailable", "none")  # status `spool_state`; none: no spool

# A row's own columns, in table order: shared with the read queries.
ROW_COLUMNS: tuple[str, ...] = (
    "broker",
    "account_id",
    "contract_key",
    "underlying",
    "expiration",
    "strike",
    "option_type",
    "multiplier",
    "quantity",
    "delta",
    "gamma",
    "theta",
    "vega",
    "rho",
    "implied_volatility",
    "underlying_price",
    "bid",
    "ask",
    "last",
    "mark",
    "event_time",
    "received_at",
    "market_data",
)
STAGED_COLUMNS: tuple[str, ...] = (*ROW_COLUMNS, "source_payload", "fingerprint")
STAGED_TYPES: tuple[str, ...] = (
    "text",
    "text",
    "text",
    "text",
    "date",
    "numeric",
    "text",
    "numeric",
    "numeric",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "timestamptz",
    "timestamptz",
    "text",
    "jsonb",
    "int8",
)

_COLUMN_LIST = ", ".join(STAGED_COLUMNS)
COPY_DIRECT = f"COPY greek_snapshots ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS snapshot_staging ON COMMIT DELETE ROWS AS "
    f"SELECT {_COLUMN_LIST} FROM greek_snapshots WITH NO DATA"
)
COPY_STAGING = f"COPY snapshot_staging ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
# What the probe asks before the writer tries again: the lock a COPY into the table needs.
# A bare `SELECT 1` would call a locked table healthy and send the writer back into the
# same wait.
PROBE_WRITE_LOCK = "LOCK TABLE greek_snapshots IN ROW EXCLUSIVE MODE"
INSERT_FROM_STAGING = (
    f"INSERT INTO greek_snapshots ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM snapshot_staging "
    "ON CONFLICT DO NOTHING"
)
_FINGERPRINT_LAYOUT = struct.Struct("<12d")
_NAN = float("nan")


def fingerprint(values: Sequence[float | None]) -> int:
    """A stable 64-bit hash of the value columns (None and NaN alike). Defined by bytes,
    not by Python's hash(), so it is the same in every process and Python version, and
    a fixture replayed next year still recognises its rows."""
    packed = _FINGERPRINT_LAYOUT.pack(*[_NAN if v is None else v for v in values])
    return ((zlib.crc32(packed) << 32) | zlib.adler32(packed)) - (1 << 63)


def copy_rows(cur: psycopg.Cursor[Any], statement: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """Binary COPY of `snapshot_row` tuples through `statement` (COPY_DIRECT/STAGING)."""
    with cur.copy(statement) as copy:
        copy.set_types(STAGED_TYPES)
        for row in rows:
            copy.write_row(row)


def _jsonb(payload: dict[str, Any] | None) -> Jsonb | None:
    return None if payload is None else Jsonb(payload, dumps=_dumps)


def _dumps(obj: Any) -> bytes:
    # bytes, not str: psycopg sends them as they are (a str would be encoded again)
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def _finite(value: float | None) -> float | None:
    """NaN/inf never reach the table: a broker's 'no value' is NULL."""
    if value is None or value - value == 0.0:
        return value
    return None


def snapshot_row(s: Snapshot) -> tuple[Any, ...]:
    quantity = s.quantity
    values = [
        _finite(v)
        for v in (
            s.delta,
            s.gamma,
            s.theta,
            s.vega,
            s.rho,
            s.implied_volatility,
            s.underlying_price,
            s.bid,
            s.ask,
            s.last,
            s.mark,
        )
    ]
    return (
        s.broker.value,
        s.account_id,
        s.contract_key,
        s.underlying,
        s.expiration,
        s.strike,
        s.option_type.value,
        s.multiplier,
        quantity,
        *values,
        s.event_time,
        s.received_at,
        s.market_data,
        _jsonb(s.source_payload),
        fingerprint([None if quantity is None else float(quantity), *values]),
    )


@dataclass
class WriterStats:
    state: StreamState = StreamState.CONNECTING
    last_error: str | None = None
    rows_received: int = 0
    rows_written: int = 0
    duplicates: int = 0
    late: int = 0
    batches: int = 0
    failed_attempts: int = 0
    last_batch_rows: int = 0
    last_flush_ms: float | None = None
    spool_bytes: int = 0
    spooled_rows: int = 0
    spool_full: int = 0
    spool_state: str = "none"  # one of SPOOL_STATES
    spool_error: str | None = None
    spool_errors: int = 0
    holding_reason: str | None = None
    held_rows: int = 0
    conflated_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_rows: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def as_json(self, queue_depth: int | None = None) -> dict[str, Any]:
        now_s = time.time()
        pct = self.latency.percentiles(now_s)
        return {
            "state": self.state.value,
            "last_error": self.last_error,
            "rows_received": self.rows_received,
            "rows_written": self.rows_written,
            "duplicates": self.duplicates,
            "late": self.late,
            "batches": self.batches,
            "failed_attempts": self.failed_attempts,
            "last_batch_rows": self.last_batch_rows,
            "last_flush_ms": self.last_flush_ms,
            "queue_depth": queue_depth,
            "spool_bytes": self.spool_bytes,
            "spooled_rows": self.spooled_rows,
            "spool_full": self.spool_full,
            "spool_state": self.spool_state,
            "spool_error": self.spool_error,
            "spool_errors": self.spool_errors,
            "holding_reason": self.holding_reason,
            "held_rows": self.held_rows,
            "conflated_by_reason": dict(self.conflated_by_reason),
            "rejected_rows": self.rejected_rows,
            "latency_ms": {
                "p50": pct[0.5],
                "p95": pct[0.95],
                "p99": pct[0.99],
                "max": self.latency.window_max(now_s),
            },
        }


# The server is unreachable or the connection broke: worth retrying the same rows.
# Anything else (a value the table refuses) would fail forever: the batch is set aside.
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError)


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
    ) -> None:
        self._url = with_timeouts(url, timeout_s)
        self.flush_rows = flush_rows
        self.flush_s = flush_ms / 1000.0
        self.slo_ms = slo_ms
        self._backoff = backoff or Backoff(initial=0.2, maximum=5.0)
        self._connect = connect or psycopg.connect
        # statement_timeout on the server; the client gives up a little later, so a lock
        # wait ends cleanly server-side and only a silent server is cut off by the client.
        self._statement_timeout_s = timeout_s
        self._deadline_s = timeout_s + CLIENT_GRACE_S
        self._limiter = trio.CapacityLimiter(1)
        self._link: Link | None = None
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
        self._last_spool_log = -math.inf
        self._spool_failures_unlogged = 0
        self._last_spool_probe = -math.inf
        self._progress = trio.Event()
        self._newest: dict[tuple[str, str, str], datetime] = {}
        self._batch: list[Snapshot] = []
        self._batch_due = math.inf  # when self._batch is due, from its first row
        self._in_flight: Sequence[Snapshot] = ()
        self._receive: trio.MemoryReceiveChannel[Snapshot] | None = None
        self.stats = WriterStats()
        if spool is not None:
            self.stats.spool_bytes = spool.size
            self.stats.spool_state = "ok" if spool.error is None else "unavailable"
            self.stats.spool_error = spool.error
            self.stats.spool_errors = int(spool.error is not None)

    async def wait_settled(self, rows: int) -> None:
        """Return once `rows` rows have been committed or recognised as duplicates: how
        replay, shutdown and tests know that what they handed over is in the database."""
        while self.stats.rows_written + self.stats.duplicates < rows:
            await self._progress.wait()

    @property
    def spool_pending(self) -> bool:
        return self._spool is not None and self.stats.spool_bytes > 0

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
                await trio.to_thread.run_sync(self._close)

    async def _consume(self, receive: trio.MemoryReceiveChannel[Snapshot]) -> None:
        async with receive:
            if self.spool_pending and not self._held_off():
                await self._drain_spool()
            while True:
                # While a probe runs, it wakes this loop (cancels `_idle`) once the
                # database answers; otherwise the next retry is a point in time.
                retry = self._next_attempt if self.spool_pending and not self._probing else math.inf
                with trio.move_on_at(min(self._batch_due, retry)) as self._idle:
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
        try:
            await self.write_batch(batch)
        finally:
            self._in_flight = ()

    async def write_batch(self, batch: Sequence[Snapshot]) -> None:
        """Commit one batch, or spool it while the database is unreachable, hung or not
        migrated yet, or while older rows wait in the spool (behind them, so rows reach
        the table in the order they came). When neither database nor spool takes it
        (no spool configured, or the spool's disk refuses), hold it here, say why in
        `holding_reason`, and retry both until one does."""
        self.stats.rows_received += len(batch)
        self._count_late(batch)
        rows = [snapshot_row(s) for s in batch]
        while True:
            held_off = self._held_off()
            if self._spool is not None and (held_off or self.spool_pending):
                holding = BOTH_UNAVAILABLE if held_off else SPOOL_UNAVAILABLE_WHILE_DRAINING
                if self._append_to_spool(batch, holding):
                    if not held_off:
                        await self._drain_spool()
                    return
                # Held in memory. Once the spool is drained the batch may go straight in.
                if held_off or not await self._drain_spool():
                    await self._until_retry()
                    continue
            if self._schema_ready is not None and not self._schema_ready.is_set():
                self._hold(DATABASE_DOWN_NO_SPOOL, len(batch))
                await self._schema_ready.wait()  # no spool: nowhere else for the rows
            started = time.perf_counter()
            try:
                inserted = await self._write(rows)
            except psycopg.Error as exc:
                self._on_failure(exc, len(rows))
                if self._spool is None:
                    self._hold(DATABASE_DOWN_NO_SPOOL, len(batch))
                elif self._append_to_spool(batch, BOTH_UNAVAILABLE):
                    return
                await self._until_retry()
                continue
            self._on_success(batch, inserted, started)
            return

    def _append_to_spool(self, batch: Sequence[Snapshot], holding: str = BOTH_UNAVAILABLE) -> bool:
        """Durably keep `batch` for later. False when the spool cannot take it (its cap,
        or the disk: full, read-only, I/O error): nothing of it is left in the file, the
        caller keeps it in memory as `holding` says, and the failure is counted, shown
        in status and logged (rate-limited)."""
        assert self._spool is not None
        try:
            self._spool.append(batch)
        except SpoolUnavailable as exc:
            self._spool_failed(exc, holding=holding, rows=len(batch))
            return False
        self._spool_ok()
        self._release_hold()
        self.stats.spool_bytes = self._spool.size
        self.stats.spooled_rows += len(batch)
        log.warning("batch_spooled", rows=len(batch), spool_bytes=self.stats.spool_bytes)
        return True

    def _spool_failed(
        self, exc: SpoolUnavailable, *, holding: str | None = None, rows: int = 0
    ) -> None:
        full = isinstance(exc, SpoolFull)
        if full:
            self.stats.spool_full += 1
        else:
            self.stats.spool_errors += 1
        self.stats.spool_state = "full" if full else "unavailable"
        self.stats.spool_error = exc.reason
        if holding is not None:
            self._hold(holding, rows)
        self._spool_failures_unlogged += 1
        now = trio.current_time()
        if now - self._last_spool_log < SPOOL_LOG_EVERY_S:
            return
        self._last_spool_log = now
        assert self._spool is not None
        log.error(
            "spool_full" if full else "spool_unavailable",
            error=exc.reason,
            failures=self._spool_failures_unlogged,
            spool_bytes=self._spool.size,
            held_rows=rows,
            consequence=(
                f"{holding}: holding rows in memory; the channel will conflate"
                if holding
                else "spool left as it is; retrying"
            ),
        )
        self._spool_failures_unlogged = 0

    def _spool_ok(self) -> None:
        if self.stats.spool_state in ("full", "unavailable"):
            log.info("spool_available", after_error=self.stats.spool_error)
        self.stats.spool_state = "ok"
        self.stats.spool_error = None
        self._spool_failures_unlogged = 0
        self._last_spool_log = -math.inf

    def _hold(self, reason: str, rows: int) -> None:
        """A batch waits in memory because nothing takes it: the status says why, and
        the sink counts conflation under that reason (`note_conflated`)."""
        self.stats.holding_reason = reason
        self.stats.held_rows = rows

    def _release_hold(self) -> None:
        """A batch left memory (committed or spooled): nothing is held any more. While
        the spool is marked unavailable, check now and then whether it is back, so the
        status does not keep saying so after the disk recovered."""
        self.stats.holding_reason = None
        self.stats.held_rows = 0
        spool = self._spool
        if spool is None or self.stats.spool_state == "ok":
            return
        now = trio.current_time()
        if now - self._last_spool_probe < SPOOL_PROBE_EVERY_S:
            return
        self._last_spool_probe = now
        try:
            spool.probe()
        except SpoolUnavailable:
            return
        self._spool_ok()

    def backlog_reason(self) -> str:
        return self.stats.holding_reason or WRITER_BEHIND

    def note_conflated(self) -> str:
        """The sink replaced a waiting row by a newer one for the same contract: count it
        under the reason the channel is full, and return that reason for its log line."""
        reason = self.backlog_reason()
        by_reason = self.stats.conflated_by_reason
        by_reason[reason] = by_reason.get(reason, 0) + 1
        return reason

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
                self._spool_failed(exc)
                self._retry_later()
                return False
            if item is None:
                break
            batch, end = item
            started = time.perf_counter()
            try:
                inserted = await self._write([snapshot_row(s) for s in batch])
            except UNREACHABLE as exc:
                self._on_failure(exc, len(batch))
                return False
            except psycopg.Error as exc:
                if not self._reject(batch, exc):
                    self._retry_later()
                    return False
            else:
                self._on_success(batch, inserted, started)
                drained += len(batch)
            try:
                spool.mark_drained(end)
            except SpoolUnavailable as exc:  # rows are in the database; the file stays
                self._spool_failed(exc)
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
                if self._append_to_spool(chunk, holding=SPOOL_UNAVAILABLE_WHILE_DRAINING):
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

    def _reject(self, batch: Sequence[Snapshot], exc: psycopg.Error) -> bool:
        """A spooled batch the database refuses for its content: set it aside in a
        `.rejected.jsonl` file next to the spool (never dropped), count it, say so.
        False when the disk refuses that file too: the batch then stays spooled (and
        blocks the drain behind it, so order holds) until the disk recovers."""
        assert self._spool is not None
        rejected = self._spool.path.with_suffix(".rejected.jsonl")
        error = f"{type(exc).__name__}: {str(exc).strip()}"
        lines = b"".join(orjson.dumps(snapshot_to_dict(s)) + b"\n" for s in batch)
        try:
            append_durably(rejected, lines)
        except OSError as os_error:
            self._spool_failed(
                SpoolUnavailable.from_os_error(
                    os_error, f"setting a rejected batch aside in {rejected}"
                )
            )
            log.error(
                "spooled_batch_reject_failed",
                rows=len(batch),
                target=str(rejected),
                error=error,
                disk_error=self.stats.spool_error,
                consequence="the batch stays in the spool; retrying",
            )
            return False
        self.stats.rejected_rows += len(batch)
        log.error("spooled_batch_rejected", rows=len(batch), moved_to=str(rejected), error=error)
        return True

    def _on_success(self, batch: Sequence[Snapshot], inserted: int, started: float) -> None:
        committed = datetime.now(UTC)
        self._backoff.reset()
        self._next_attempt = -math.inf
        self._release_hold()
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
        return len(pending) if self._append_to_spool(pending) else 0

    def _count_late(self, batch: Sequence[Snapshot]) -> None:
        """Out-of-order policy: an event older than the newest one already accepted for
        its contract is stored (queries order by event_time) and counted as late."""
        newest = self._newest
        for s in batch:
            key = (s.broker.value, s.account_id, s.contract_key)
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
            self._next_attempt = trio.current_time() + self._deadline_s
            try:
                await call_bounded(self._probe_sync, self._deadline_s, self._limiter)
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

    def _probe_sync(self, watch: Watch) -> None:
        link = watch.open(self._connect, self._url, self._statement_timeout_s)
        try:
            link.conn.execute(PROBE_WRITE_LOCK)
            link.conn.rollback()
        finally:
            link.close()

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

    async def _write(self, rows: list[tuple[Any, ...]]) -> int:
        """One bounded attempt (greeksd/store/deadline.py) on the writer's connection.
        The worker thread owns the connection while it runs; after a timeout it keeps
        it, fails on the severed socket and closes it, and the next attempt connects
        afresh: two threads never share a connection."""
        link, self._link = self._link, None
        link, inserted = await call_bounded(
            partial(self._write_sync, link, rows), self._deadline_s, self._limiter
        )
        self._link = link
        return inserted

    def _write_sync(
        self, link: Link | None, rows: list[tuple[Any, ...]], watch: Watch
    ) -> tuple[Link, int]:
        """COPY straight into the table; if a row is already stored, write the batch
        again through staging + ON CONFLICT DO NOTHING. Returns the connection (for the
        next batch) and the rows inserted; on any failure closes the connection."""
        if link is not None and link.conn.closed:
            link.close()
            link = None
        if link is None:
            link = watch.open(self._connect, self._url, self._statement_timeout_s)
            fresh = True
        else:
            watch.use(link)
            fresh = False
        conn = link.conn
        try:
            if fresh:
                conn.execute(CREATE_STAGING)
                conn.commit()
            try:
                with conn.cursor() as cur:
                    copy_rows(cur, COPY_DIRECT, rows)
                conn.commit()
                return link, len(rows)
            except psycopg.errors.UniqueViolation:
                conn.rollback()
            with conn.cursor() as cur:
                copy_rows(cur, COPY_STAGING, rows)
                cur.execute(INSERT_FROM_STAGING)
                inserted = cur.rowcount
            conn.commit()
        except BaseException:
            link.close()
            raise
        return link, inserted

    def _close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
