"""The raw-frame archive: every inbound frame of every source, kept on disk, compressed.

The service hangs an `Archive` on every broker stream as a `Recorder` (next to a fixture
recorder, if any: greeksd.recording.FanOut), so it sees exactly what a recording sees:
each frame with its receive time, each new connection, each change of the tracked
positions. Files are fixtures (greeksd.recording), so `greeksd replay FILE` reads one as
it is:

    $GREEKSD_DATA_DIR/archive/<source>/<YYYY-MM-DDTHH>.jsonl.gz     (UTC hour received)

one file per source per hour, a gzip member per flush (gzip readers read consecutive
members as one stream). A file that starts while a connection is open begins with that
connection's `link` and `positions` records marked `resumed` (greeksd.replay applies
them only when a replay starts there), so an hour file replays on its own. A second
file for the same hour (a restart, or a fresh start after a disk error) gets a `.N`
suffix: nothing is ever appended after a tail a crash may have cut (an empty file, as a
full disk leaves behind, is reused).

Flush policy: the websocket reader only appends to an in-memory list (no I/O, no
serialization, no waiting); a worker thread writes, every `flush_ms` or as soon as
`flush_frames` records wait, one gzip member per source and fsyncs it. So a crash of the
process or the machine loses at most the records of the last flush interval. A disk
that refuses (full, read-only, I/O error) costs the records of the refused flush: they
are counted (`dropped`), logged, and the archive state says `failing` until a flush
succeeds again; streaming and the database path never wait for it. If the worker falls
`max_pending` records behind (a disk that hangs), newer records are dropped and counted
the same way instead of growing memory.

Retention: on start and on every new hour, files whose hour ended more than
`retention_days` ago are deleted (0 keeps everything).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import trio

from greeksd import config
from greeksd.logs import get_logger
from greeksd.model import Recorder
from greeksd.recording import (
    FanOut,
    fixture_header,
    frame_record,
    link_record,
    positions_record,
)

log = get_logger("greeksd.archive")

FLUSH_FRAMES = 10_000
MAX_PENDING = 200_000
HOUR_FORMAT = "%Y-%m-%dT%H"
SUFFIX = ".jsonl.gz"
COMPRESS_LEVEL = 6  # zlib's default: most of level 9's ratio at a fraction of its CPU
CLOSE_WAIT_S = 10.0  # shutdown waits this long for the last flush on a hung disk
STATES = ("ok", "failing")

# A record waiting for the worker: the source, its time, and either a ready record
# (link, positions: rare, built on the reader's side) or a raw frame (serialized and
# scrubbed by the worker, off the reader's path).
Pending = tuple[str, datetime, "dict[str, Any] | str | bytes"]


@dataclass
class ArchiveStats:
    """What status and metrics show of the archive."""

    state: str = "ok"
    records: int = 0  # records on disk (fsynced)
    bytes: int = 0  # compressed bytes on disk
    files: int = 0  # files started
    dropped: int = 0  # records lost: the disk refused them, or the backlog was full
    errors: int = 0  # disk operations refused (write, fsync, open, prune)
    pruned: int = 0  # files deleted by retention
    last_error: str | None = None
    last_flush_at: datetime | None = None

    def as_json(self, pending: int) -> dict[str, Any]:
        return {
            "state": self.state,
            "records": self.records,
            "bytes": self.bytes,
            "files": self.files,
            "pending": pending,
            "dropped": self.dropped,
            "errors": self.errors,
            "pruned": self.pruned,
            "last_error": self.last_error,
            "last_flush_at": self.last_flush_at.isoformat() if self.last_flush_at else None,
        }


@dataclass
class _File:
    """One source's open hour file, and what its next member holds."""

    hour: str
    path: Path
    fd: int
    lines: list[bytes] = field(default_factory=list)
    records: int = 0  # of `lines`, those the streams recorded (not header or resumed)


class Archive:
    """A `Recorder` appending to the archive under `root`. The recorder methods run on
    the reader's thread and only append; `flush` and `close` run on one worker thread
    (see `open_archive`), or directly in tests."""

    def __init__(
        self,
        root: Path,
        *,
        retention_days: int = config.ARCHIVE_RETENTION_DAYS,
        flush_ms: int = config.ARCHIVE_FLUSH_MS,
        flush_frames: int = FLUSH_FRAMES,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.root = root
        self.retention_days = retention_days
        self.flush_ms = flush_ms
        self.flush_frames = flush_frames
        self.max_pending = max_pending
        self.clock = clock
        self.stats = ArchiveStats()
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        self._overflowing = False
        self.wake = threading.Event()
        self._files: dict[str, _File] = {}
        # per source, the open connection's link and positions records (for `resumed`)
        self._link: dict[str, dict[str, Any]] = {}
        self._positions: dict[str, dict[str, Any]] = {}

    # ---- the reader's side (Recorder) ---------------------------------------------------
    def link(self, broker: str, at: datetime, **details: Any) -> None:
        self._put((broker, at, link_record(broker, at, details)))

    def positions(
        self, broker: str, positions: Sequence[Any], at: datetime, **details: Any
    ) -> None:
        self._put((broker, at, positions_record(broker, positions, at, details)))

    def frame(self, broker: str, data: str | bytes, received_at: datetime) -> None:
        self._put((broker, received_at, data))

    def _put(self, item: Pending) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.stats.dropped += 1
                overflow_starts, self._overflowing = not self._overflowing, True
            else:
                self._pending.append(item)
                overflow_starts = False
            waiting = len(self._pending)
        if overflow_starts:
            log.error(
                "archive_backlog_full",
                pending=waiting,
                consequence="newer frames are not archived (counted in dropped) until "
                "the disk catches up; streaming is not affected",
            )
        if waiting >= self.flush_frames:
            self.wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---- the worker's side --------------------------------------------------------------
    def flush(self) -> None:
        """Write what waits: one gzip member per source, fsynced."""
        with self._lock:
            batch, self._pending = self._pending, []
            overflowed, self._overflowing = self._overflowing, False
        if overflowed:
            log.info("archive_backlog_drained", dropped=self.stats.dropped)
        for source, at, item in batch:
            record = item if isinstance(item, dict) else frame_record(source, item, at)
            file = self._file_for(source, at)
            file.lines.append(orjson.dumps(record) + b"\n")
            file.records += 1
            if record["k"] == "link":
                self._link[source] = record
                self._positions.pop(source, None)
            elif record["k"] == "positions":
                self._positions[source] = record
        for source, file in list(self._files.items()):
            if file.lines:
                self._write(source, file)

    def _file_for(self, source: str, at: datetime) -> _File:
        hour = at.astimezone(UTC).strftime(HOUR_FORMAT)
        file = self._files.get(source)
        if file is not None and file.hour == hour:
            return file
        if file is not None:  # a new hour: the old file is complete
            self._write(source, file)
            self._close(source)
            self.prune()
        file = self._files[source] = self._open(source, hour, at)
        return file

    def _open(self, source: str, hour: str, at: datetime) -> _File:
        """A new file for `source`'s `hour`, starting with a header and the open
        connection's state (the file descriptor is opened at the first write)."""
        directory = self.root / source
        path = directory / f"{hour}{SUFFIX}"
        number = 0
        while path.exists() and path.stat().st_size > 0:  # an empty one holds no torn tail
            number += 1
            path = directory / f"{hour}.{number}{SUFFIX}"
        file = _File(hour, path, -1)
        file.lines.append(orjson.dumps(fixture_header([source], at)) + b"\n")
        for carried in (self._link.get(source), self._positions.get(source)):
            if carried is not None:
                resumed = carried | {"t": at.isoformat(), "resumed": True, "since": carried["t"]}
                file.lines.append(orjson.dumps(resumed) + b"\n")
        return file

    def _write(self, source: str, file: _File) -> None:
        lines, records, file.lines, file.records = file.lines, file.records, [], 0
        data = gzip.compress(b"".join(lines), COMPRESS_LEVEL)
        try:
            if file.fd < 0:
                file.path.parent.mkdir(parents=True, exist_ok=True)
                file.fd = os.open(file.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self.stats.files += 1
            view = memoryview(data)
            while view:
                view = view[os.write(file.fd, view) :]
            os.fsync(file.fd)
        except OSError as exc:
            self._failed(source, file, records, exc)
            return
        self.stats.records += records
        self.stats.bytes += len(data)
        self.stats.last_flush_at = self.clock()
        if self.stats.state != "ok":
            self.stats.state = "ok"
            log.info("archive_recovered", file=str(file.path))

    def _failed(self, source: str, file: _File, lost: int, exc: OSError) -> None:
        """The disk refused a member: it is lost (counted), the file may end in a torn
        member, so the next flush starts a new file (with the connection's state)."""
        reason = f"{type(exc).__name__}: {exc}"
        self.stats.errors += 1
        with self._lock:  # the reader's side counts its drops too
            self.stats.dropped += lost
        self.stats.last_error = reason
        if self.stats.state != "failing":
            self.stats.state = "failing"
            log.error(
                "archive_write_failed",
                file=str(file.path),
                error=reason,
                lost_records=lost,
                consequence="frames are not archived until the disk takes writes again; "
                "streaming and the database are not affected",
            )
        self._close(source)

    def _close(self, source: str) -> None:
        file = self._files.pop(source, None)
        if file is not None and file.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(file.fd)

    def close(self) -> None:
        """Flush what waits and close every file (each member is already fsynced)."""
        self.flush()
        for source in list(self._files):
            self._close(source)

    def prune(self) -> None:
        """Delete the files whose hour ended more than `retention_days` ago."""
        if self.retention_days <= 0 or not self.root.is_dir():
            return
        cutoff = self.clock() - timedelta(days=self.retention_days)
        for path in sorted(self.root.glob(f"*/*{SUFFIX}")):
            hour = hour_of(path)
            if hour is None or hour + timedelta(hours=1) > cutoff:
                continue
            try:
                path.unlink()
            except OSError as exc:
                self.stats.errors += 1
                log.error("archive_prune_failed", file=str(path), error=str(exc))
                continue
            self.stats.pruned += 1
            log.info("archive_pruned", file=str(path), retention_days=self.retention_days)

    def run_worker(self, stop: threading.Event) -> None:
        """The worker thread: prune, then flush every `flush_ms` (or when woken) until
        `stop`, then flush the rest and close."""
        self.prune()
        while not stop.is_set():
            self.wake.wait(self.flush_ms / 1000)
            self.wake.clear()
            self.flush()
        self.close()


def hour_of(path: Path) -> datetime | None:
    """The UTC hour an archive file's name says (None for a file that is not one)."""
    try:
        return datetime.strptime(path.name[:13], HOUR_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def source_files(root: Path, source: str) -> list[Path]:
    """A source's archive files in the order they were written."""

    def order(path: Path) -> tuple[str, int]:
        middle = path.name[13 : -len(SUFFIX)].lstrip(".")
        return path.name[:13], int(middle) if middle.isdigit() else 0

    return sorted((root / source).glob(f"*{SUFFIX}"), key=order)


def with_recorder(existing: Recorder | None, added: Recorder) -> Recorder:
    """`added`, next to a stream's own recorder if it has one."""
    return added if existing is None else FanOut(existing, added)


@contextlib.asynccontextmanager
async def open_archive(archive: Archive) -> AsyncIterator[Archive]:
    """Run `archive`'s worker thread for the block; on exit it writes what waits and
    closes (waited for at most CLOSE_WAIT_S: a hung disk must not hang shutdown)."""
    stop = threading.Event()
    worker = threading.Thread(
        target=archive.run_worker, args=(stop,), name="greeksd-archive", daemon=True
    )
    worker.start()
    log.info(
        "archive_started",
        root=str(archive.root),
        flush_ms=archive.flush_ms,
        retention_days=archive.retention_days,
    )
    try:
        yield archive
    finally:
        stop.set()
        archive.wake.set()
        with trio.CancelScope(shield=True):
            started = time.monotonic()
            await trio.to_thread.run_sync(worker.join, CLOSE_WAIT_S)
        if worker.is_alive():
            log.error(
                "archive_close_timeout",
                waited_s=round(time.monotonic() - started, 1),
                pending=archive.pending,
                consequence="the last frames may not be archived",
            )
