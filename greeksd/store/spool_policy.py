"""Spool policy: where a batch goes when the database does not take it, and why rows wait.

A batch the database cannot take is appended to the disk spool. A spool whose disk
refuses (full, read-only, I/O error) does not stop the writer either: the batch waits in
memory, the status says why (`holding_reason`), and the sink counts what conflates under
that reason. A spooled batch the table refuses for its content is set aside next to the
spool, never dropped. This module keeps those decisions and their status fields, logs
and counters; the writer's run loop (greeksd/store/writer.py) decides when to ask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson
import psycopg
import trio

from greeksd.logs import get_logger
from greeksd.model import Snapshot
from greeksd.store.columns import snapshot_to_dict
from greeksd.store.spool import Spool, SpoolFull, SpoolUnavailable, append_durably
from greeksd.store.writer_stats import WriterStats

log = get_logger("greeksd.writer")

# Why rows wait in memory (status `holding_reason`, the sink's conflation reason).
BOTH_UNAVAILABLE = "database and spool both unavailable"
DATABASE_DOWN_NO_SPOOL = "database unavailable and no spool configured"
SPOOL_UNAVAILABLE_WHILE_DRAINING = "spool unavailable while it drains"
WRITER_BEHIND = "writer behind the inflow"
SPOOL_LOG_EVERY_S = 5.0  # at most one spool-failure log line per this many seconds
SPOOL_PROBE_EVERY_S = 1.0  # while rows commit, how often an unavailable spool is re-checked


class SpoolPolicy:
    """The writer's spool (None: none configured) and the status fields that describe
    it and any batch held in memory."""

    def __init__(self, spool: Spool | None, stats: WriterStats) -> None:
        self.spool = spool
        self.stats = stats
        self._last_log = -math.inf
        self._failures_unlogged = 0
        self._last_probe = -math.inf
        if spool is not None:
            stats.spool_bytes = spool.size
            stats.spool_state = "ok" if spool.error is None else "unavailable"
            stats.spool_error = spool.error
            stats.spool_errors = int(spool.error is not None)

    @property
    def pending(self) -> bool:
        """Rows wait in the spool (new batches go behind them)."""
        return self.spool is not None and self.stats.spool_bytes > 0

    def append(self, batch: Sequence[Snapshot], holding: str = BOTH_UNAVAILABLE) -> bool:
        """Durably keep `batch` for later. False when the spool cannot take it (its cap,
        or the disk: full, read-only, I/O error): nothing of it is left in the file, the
        caller keeps it in memory as `holding` says, and the failure is counted, shown
        in status and logged (rate-limited)."""
        assert self.spool is not None
        try:
            self.spool.append(batch)
        except SpoolUnavailable as exc:
            self.failed(exc, holding=holding, rows=len(batch))
            return False
        self._ok()
        self.release_hold()
        self.stats.spool_bytes = self.spool.size
        self.stats.spooled_rows += len(batch)
        log.warning("batch_spooled", rows=len(batch), spool_bytes=self.stats.spool_bytes)
        return True

    def failed(self, exc: SpoolUnavailable, *, holding: str | None = None, rows: int = 0) -> None:
        full = isinstance(exc, SpoolFull)
        if full:
            self.stats.spool_full += 1
        else:
            self.stats.spool_errors += 1
        self.stats.spool_state = "full" if full else "unavailable"
        self.stats.spool_error = exc.reason
        if holding is not None:
            self.hold(holding, rows)
        self._failures_unlogged += 1
        now = trio.current_time()
        if now - self._last_log < SPOOL_LOG_EVERY_S:
            return
        self._last_log = now
        assert self.spool is not None
        log.error(
            "spool_full" if full else "spool_unavailable",
            error=exc.reason,
            failures=self._failures_unlogged,
            spool_bytes=self.spool.size,
            held_rows=rows,
            consequence=(
                f"{holding}: holding rows in memory; the channel will conflate"
                if holding
                else "spool left as it is; retrying"
            ),
        )
        self._failures_unlogged = 0

    def _ok(self) -> None:
        if self.stats.spool_state in ("full", "unavailable"):
            log.info("spool_available", after_error=self.stats.spool_error)
        self.stats.spool_state = "ok"
        self.stats.spool_error = None
        self._failures_unlogged = 0
        self._last_log = -math.inf

    def hold(self, reason: str, rows: int) -> None:
        """A batch waits in memory because nothing takes it: the status says why, and
        the sink counts conflation under that reason (`note_conflated`)."""
        self.stats.holding_reason = reason
        self.stats.held_rows = rows

    def release_hold(self) -> None:
        """A batch left memory (committed or spooled): nothing is held any more. While
        the spool is marked unavailable, check now and then whether it is back, so the
        status does not keep saying so after the disk recovered."""
        self.stats.holding_reason = None
        self.stats.held_rows = 0
        spool = self.spool
        if spool is None or self.stats.spool_state == "ok":
            return
        now = trio.current_time()
        if now - self._last_probe < SPOOL_PROBE_EVERY_S:
            return
        self._last_probe = now
        try:
            spool.probe()
        except SpoolUnavailable:
            return
        self._ok()

    def reject(self, batch: Sequence[Snapshot], exc: psycopg.Error) -> bool:
        """A spooled batch the database refuses for its content: set it aside in a
        `.rejected.jsonl` file next to the spool (never dropped), count it, say so.
        False when the disk refuses that file too: the batch then stays spooled (and
        blocks the drain behind it, so order holds) until the disk recovers."""
        assert self.spool is not None
        rejected = self.spool.path.with_suffix(".rejected.jsonl")
        error = f"{type(exc).__name__}: {str(exc).strip()}"
        lines = b"".join(orjson.dumps(snapshot_to_dict(s)) + b"\n" for s in batch)
        try:
            append_durably(rejected, lines)
        except OSError as os_error:
            self.failed(
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

    def backlog_reason(self) -> str:
        return self.stats.holding_reason or WRITER_BEHIND

    def note_conflated(self) -> str:
        """The sink replaced a waiting row by a newer one for the same contract: count it
        under the reason the channel is full, and return that reason for its log line."""
        reason = self.backlog_reason()
        by_reason = self.stats.conflated_by_reason
        by_reason[reason] = by_reason.get(reason, 0) + 1
        return reason
