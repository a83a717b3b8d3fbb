"""The disk spool: where accepted batches wait while the database is unreachable.

An append-only file of checksummed records, one record per batch, fsync'd before the
writer moves on, so a batch handed to the spool survives a crash or kill -9. Records are
replayed in order once the database is back; because the writer's insert is idempotent,
a crash between a replayed COPY and the truncation of the spool is harmless.

Record layout: MAGIC (4 bytes) | payload length (u32 BE) | crc32 of payload (u32 BE) |
payload (orjson of a list of snapshot dicts, greeksd/store/columns.py). A torn last
record (crash mid-append) is cut off on open; a record that fails its checksum elsewhere
is moved to a `.corrupt` file and counted, never silently dropped.

The disk may refuse at any moment (full, read-only, quota, I/O error). The spool never
lets an `OSError` escape: a failed append is undone (the file is cut back to its last
intact record, or, if even that fails, the leftover is cut before the next append) and
reported as `SpoolUnavailable`, so the caller still holds the batch and can retry; an
append only returns once its record is fsync'd. Opening never fails either: a spool the
disk will not let us prepare starts with `error` set and tries again on the next append.

Draining: `next_pending` / `mark_drained` walk the records in order while appends may
continue behind them (a drain running beside new arrivals). The file is emptied only when
every record in it is drained, so nothing appended during a drain is ever cut; if the
disk will not even let us empty it, the drained prefix is remembered and skipped.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

from greeksd.logs import get_logger
from greeksd.model import Snapshot
from greeksd.store.columns import snapshot_from_dict, snapshot_to_dict

log = get_logger("greeksd.spool")

MAGIC = b"GSP1"
_HEADER = struct.Struct(">4sII")


class SpoolUnavailable(RuntimeError):
    """The spool cannot take (or give back) a batch right now. Nothing was left
    half-written; the caller still owns its batch. `reason` names what failed and the
    errno (e.g. `ENOSPC`), for status fields and logs."""

    def __init__(self, reason: str, errno_name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno_name = errno_name

    @classmethod
    def from_os_error(cls, exc: OSError, doing: str) -> SpoolUnavailable:
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        return cls(f"{doing}: {name} {exc.strerror or exc}", name)


class SpoolFull(SpoolUnavailable):
    """Appending would pass the size cap (GREEKSD_SPOOL_MAX_MB)."""


def append_durably(path: Path, data: bytes, *, expected_size: int | None = None) -> None:
    """Append `data` to `path` and fsync it; on any failure cut the file back to the size
    it had (best effort: the caller must not trust the tail until it has checked) and
    re-raise the OSError. With `expected_size`, bytes beyond it (a leftover of an earlier
    failed append) are cut first."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = os.fstat(fd).st_size
        if expected_size is not None and start != expected_size:
            os.ftruncate(fd, expected_size)
            start = expected_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError as undo:
                log.error("spool_undo_failed", path=str(path), error=str(undo))
            raise
    finally:
        try:
            os.close(fd)
        except OSError as exc:  # the data was fsync'd (or the error is already raised)
            log.warning("spool_close_failed", path=str(path), error=str(exc))


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.corrupt_records = 0
        self.quarantine_failures = 0
        # Why the spool could not be prepared at open (None: ready). Appends retry.
        self.error: str | None = None
        self._end = 0  # bytes of intact records at the start of the file
        self._drained = 0  # leading bytes already in the database
        self._scanned = False  # _end is known (the file has been read once)
        self._foreign_tail = False  # bytes past _end found on open: a crash's torn record
        self._ready = False  # directory, tail and write access checked since last failure
        try:
            self._prepare()
        except SpoolUnavailable as exc:
            self.error = exc.reason
            log.error(
                "spool_unavailable_at_open",
                spool=str(path),
                error=exc.reason,
                consequence="starting anyway; appends retry, rows wait in memory meanwhile",
            )

    @property
    def size(self) -> int:
        """Bytes waiting to be drained."""
        return self._end - self._drained

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, batch: Sequence[Snapshot]) -> None:
        """Durably add one batch: returns only once the record is fsync'd. Raises
        SpoolFull (the cap) or SpoolUnavailable (the disk), and nothing else; either
        way no part of the record stays in the file."""
        payload = orjson.dumps([snapshot_to_dict(s) for s in batch], option=orjson.OPT_NON_STR_KEYS)
        record = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        if not self._ready:
            self._prepare()
        if self._end + len(record) > self.max_bytes:
            raise SpoolFull(
                f"spool {self.path} would exceed GREEKSD_SPOOL_MAX_MB "
                f"({self.max_bytes // (1024 * 1024)} MiB)"
            )
        try:
            append_durably(self.path, record, expected_size=self._end)
        except OSError as exc:
            self._ready = False  # the tail is checked (and cut) before the next append
            raise SpoolUnavailable.from_os_error(exc, f"appending to {self.path}") from exc
        self._end += len(record)
        self.error = None

    def batches(self) -> Iterator[list[Snapshot]]:
        """Every batch not yet drained, oldest first (read-only: stops at a bad record)."""
        offset = self._drained
        while offset < self._end:
            try:
                record = self._read_at(offset)
            except SpoolUnavailable:
                return
            if record is None:
                return
            batch, offset = record
            yield batch

    def next_pending(self) -> tuple[list[Snapshot], int] | None:
        """The oldest batch not yet drained and the offset just past it; None when
        nothing is pending. A record that fails its checksum is moved, with everything
        after it, to `.corrupt` (counted) and the spool ends there. Raises
        SpoolUnavailable when the file cannot be read."""
        if self._drained >= self._end:
            return None
        record = self._read_at(self._drained)
        if record is None:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._drained)
                    bad = f.read(self._end - self._drained)
            except OSError as exc:
                raise SpoolUnavailable.from_os_error(exc, f"reading {self.path}") from exc
            self.corrupt_records += 1
            self._quarantine(bad)
            self._end = self._drained
            self._ready = False  # the bad bytes are cut before the next append
            self._reclaim()
        return record

    def mark_drained(self, end: int) -> None:
        """Everything before `end` is in the database. Once nothing is pending the file
        is emptied; if the disk refuses, the drained prefix is remembered (and skipped)
        and SpoolUnavailable says why."""
        self._drained = end
        self._reclaim()

    def clear(self) -> None:
        """Everything in the spool is in the database: start empty."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"emptying {self.path}") from exc
        self._end = self._drained = 0

    def probe(self) -> None:
        """Check the spool could take an append now (directory, tail, write access, some
        free space) without writing a record; raises SpoolUnavailable if not."""
        self._prepare()
        try:
            free = os.statvfs(self.path.parent)
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"checking {self.path.parent}") from exc
        if free.f_bavail * free.f_frsize < _HEADER.size + 1:
            raise SpoolUnavailable(f"checking {self.path.parent}: ENOSPC no free space", "ENOSPC")

    def _reclaim(self) -> None:
        if self._drained < self._end:
            return
        try:
            os.truncate(self.path, 0)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(
                exc, f"emptying the drained spool {self.path} (its rows are in the database)"
            ) from exc
        self._end = self._drained = 0

    def _read_at(self, offset: int) -> tuple[list[Snapshot], int] | None:
        try:
            with self.path.open("rb") as f:
                f.seek(offset)
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return None
                magic, length, crc = _HEADER.unpack(header)
                payload = f.read(length) if magic == MAGIC else b""
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"reading {self.path}") from exc
        end = offset + _HEADER.size + length
        if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
            return None
        if end > self._end:
            return None
        return [snapshot_from_dict(d) for d in orjson.loads(payload)], end

    def _quarantine(self, data: bytes) -> bool:
        """Keep unreadable bytes aside in `.corrupt`; if the disk refuses, say so (the
        bytes are lost once the spool is cut) and carry on: never a reason not to start."""
        corrupt = self.path.with_suffix(self.path.suffix + ".corrupt")
        try:
            append_durably(corrupt, data)
        except OSError as exc:
            self.quarantine_failures += 1
            log.error(
                "spool_quarantine_failed",
                spool=str(self.path),
                target=str(corrupt),
                bytes_lost=len(data),
                error=SpoolUnavailable.from_os_error(exc, "writing").reason,
            )
            return False
        log.error(
            "spool_record_corrupt", spool=str(self.path), moved_to=str(corrupt), bytes=len(data)
        )
        return True

    def _prepare(self) -> None:
        """Make the file fit for appends: directory there, intact records known, any
        torn tail cut (a crash's tail kept aside in `.corrupt` first), write access.
        Raises SpoolUnavailable; safe to call again later."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"creating {self.path.parent}") from exc
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"reading {self.path}") from exc
        if not self._scanned:
            self._end = self._intact_length()
            self._scanned = True
            self._foreign_tail = size > self._end
            self.corrupt_records += int(self._foreign_tail)
        if size > self._end:
            self._cut_tail(size)
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"opening {self.path}") from exc
        self._ready = True

    def _intact_length(self) -> int:
        good = 0
        try:
            with self.path.open("rb") as f:
                while header := f.read(_HEADER.size):
                    if len(header) < _HEADER.size:
                        break
                    magic, length, crc = _HEADER.unpack(header)
                    payload = f.read(length)
                    if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                        break
                    good = f.tell()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(exc, f"reading {self.path}") from exc
        return good

    def _cut_tail(self, size: int) -> None:
        """A crash during append can leave a partial last record (kept aside first); a
        failed append of ours can leave one too (the batch is still in memory: just cut).
        Cut it so later appends stay readable."""
        if self._foreign_tail:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._end)
                    tail = f.read()
            except OSError as exc:
                raise SpoolUnavailable.from_os_error(exc, f"reading {self.path}") from exc
            if self._quarantine(tail):
                self._foreign_tail = False
        try:
            os.truncate(self.path, self._end)
        except OSError as exc:
            raise SpoolUnavailable.from_os_error(
                exc, f"cutting the torn tail of {self.path}"
            ) from exc
        if self._foreign_tail:
            self._foreign_tail = False  # lost: spool_quarantine_failed said so
        log.warning(
            "spool_torn_tail_cut",
            spool=str(self.path),
            kept_bytes=self._end,
            cut_bytes=size - self._end,
        )
