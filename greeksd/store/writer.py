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

from greeksd.backoff import Backoff
from greeksd.latency import LatencyHistogram
from greeksd.logs import get_logger
from greeksd.model import Snapshot, StreamState
from greeksd.store.deadline import CLIENT_GRACE_S, Link, Watch, call_bounded, with_timeouts
from greeksd.store.spool import Spool, SpoolFull, snapshot_to_dict

log = get_logger("greeksd.writer")

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
        flush_rows: int = 50,
        flush_ms: int = 1000,
        slo_ms: int = 500,
        backoff: Backoff | None = None,
        connect: Callable[[str], psycopg.Connection] | None = None,
        spool: Spool | None = None,
        timeout_s: float = 5.0,
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
        self._idle: trio.CancelScope | None = None
        self._next_attempt = -math.inf
        self._last_slo_warning = -math.inf
        self._last_spool_full_log = -math.inf
        self._progress = trio.Event()
        self._newest: dict[tuple[str, str, str], datetime] = {}
        self._batch: list[Snapshot] = []
        self._receive: trio.MemoryReceiveChannel[Snapshot] | None = None
        self.stats = WriterStats()
        if spool is not None:
            self.stats.spool_bytes = spool.size

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
        committed (or, while the database is down, durably spooled) before this returns.
        A leftover spool from an earlier run is drained first. Cancelling it abandons
        the current batch, so shut down by closing the channel instead."""
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
        if self.spool_pending and not self._held_off():
            await self._drain_spool()
        deadline = math.inf
        async with receive:
            while True:
                # While a probe runs, it wakes this loop (cancels `_idle`) once the
                # database answers; otherwise the next retry is a point in time.
                retry = self._next_attempt if self.spool_pending and not self._probing else math.inf
                with trio.move_on_at(min(deadline, retry)) as self._idle:
                    try:
                        first = await receive.receive()
                    except trio.EndOfChannel:
                        break
                    if not self._batch:
                        deadline = trio.current_time() + self.flush_s
                    self._batch.append(first)
                    while len(self._batch) < self.flush_rows:
                        try:
                            self._batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    if len(self._batch) < self.flush_rows:
                        continue
                if self._batch:
                    await self.write_batch(self._batch)
                    self._batch = []
                    deadline = math.inf
                elif self.spool_pending and not self._held_off():
                    await self._drain_spool()
        if self._batch:
            await self.write_batch(self._batch)
            self._batch = []
        if self.spool_pending and not self._held_off():
            await self._drain_spool()  # one last try, so a healthy database ends up complete

    async def write_batch(self, batch: Sequence[Snapshot]) -> None:
        """Commit one batch, or spool it while the database is unreachable, hung or not
        migrated yet; without a spool (or with a full one), retry with backoff until it
        commits."""
        self.stats.rows_received += len(batch)
        self._count_late(batch)
        rows = [snapshot_row(s) for s in batch]
        while True:
            if self._spool is not None and (
                self._held_off() or (self.spool_pending and not await self._drain_spool())
            ):
                if self._append_to_spool(batch):
                    return
                await self._until_retry()
                continue
            if self._schema_ready is not None:
                await self._schema_ready.wait()  # no spool: nowhere else for the rows
            started = time.perf_counter()
            try:
                inserted = await self._write(rows)
            except psycopg.Error as exc:
                self._on_failure(exc, len(rows))
                if self._spool is not None and self._append_to_spool(batch):
                    return
                await self._until_retry()
                continue
            self._on_success(batch, inserted, started)
            return

    def _append_to_spool(self, batch: Sequence[Snapshot]) -> bool:
        """Durably keep `batch` for later; False when the spool is full (loudly)."""
        assert self._spool is not None
        try:
            self._spool.append(batch)
        except SpoolFull as exc:
            self.stats.spool_full += 1
            now = trio.current_time()
            if now - self._last_spool_full_log > 10.0:
                self._last_spool_full_log = now
                log.error(
                    "spool_full",
                    error=str(exc),
                    spool_bytes=self._spool.size,
                    consequence="holding batches in memory; the channel will conflate",
                )
            return False
        self.stats.spool_bytes = self._spool.size
        self.stats.spooled_rows += len(batch)
        log.warning("batch_spooled", rows=len(batch), spool_bytes=self.stats.spool_bytes)
        return True

    async def _drain_spool(self) -> bool:
        """Replay the spool in order; True when it is empty again. Idempotent: rows that
        an interrupted earlier drain already committed come back as duplicates."""
        assert self._spool is not None
        drained = 0
        for batch in self._spool.batches():
            started = time.perf_counter()
            try:
                inserted = await self._write([snapshot_row(s) for s in batch])
            except UNREACHABLE as exc:
                self._on_failure(exc, len(batch))
                return False
            except psycopg.Error as exc:
                self._reject(batch, exc)
                continue
            self._on_success(batch, inserted, started)
            drained += len(batch)
        self._spool.clear()
        self.stats.spool_bytes = 0
        log.info("spool_drained", rows=drained)
        return True

    def _reject(self, batch: Sequence[Snapshot], exc: psycopg.Error) -> None:
        """A spooled batch the database refuses for its content: set it aside in a
        `.rejected` file next to the spool (never dropped), count it, say so."""
        assert self._spool is not None
        rejected = self._spool.path.with_suffix(".rejected.jsonl")
        with rejected.open("ab") as f:
            for s in batch:
                f.write(orjson.dumps(snapshot_to_dict(s)) + b"\n")
        self.stats.rejected_rows += len(batch)
        log.error(
            "spooled_batch_rejected",
            rows=len(batch),
            moved_to=str(rejected),
            error=f"{type(exc).__name__}: {str(exc).strip()}",
        )

    def _on_success(self, batch: Sequence[Snapshot], inserted: int, started: float) -> None:
        committed = datetime.now(UTC)
        self._backoff.reset()
        self._next_attempt = -math.inf
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
        pending, self._batch = self._batch, []
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
        """True while the run loop must not send anything to the database: before the
        schema exists, while a probe is in charge, or before the backoff has passed."""
        return (
            self._probing or not self._schema_is_ready() or trio.current_time() < self._next_attempt
        )

    async def _until_retry(self) -> None:
        """Sleep until the next attempt, at least a short step: while a probe's attempt
        is in flight its verdict is not yet in `_next_attempt`, and this must not spin."""
        await trio.sleep_until(max(self._next_attempt, trio.current_time() + 0.05))

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
