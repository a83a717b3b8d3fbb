"""`greeksd archive frames`: the raw frames that produced a stored row.

A stored row names its source, its contract and the time its frame was received
(`received_at`, the frame record's time to the microsecond). The archive holds that
source's frames by hour; replaying them through the source's own protocol code
(greeksd.replay.Replayers, the path `greeksd replay` takes) shows which frames yielded a
row for the contract. Protocol state is built from the connection's start: when the
first hour file of the window begins mid-connection (`resumed`), earlier files are read
from the one where the connection started.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from greeksd.archive import hour_of, source_files
from greeksd.model import Snapshot
from greeksd.recording import Record, read_fixture
from greeksd.replay import Replayers, ReplayStats
from greeksd.store.columns import MEASURES

ROW_FIELDS = ("contract_key", "account_id", "event_time", "received_at", *MEASURES)


@dataclass(frozen=True)
class FrameMatch:
    """A frame in the window that yielded rows for the contract."""

    path: Path
    record: Record
    link: Record | None  # the connection it arrived on
    rows: list[Snapshot]
    exact: bool  # received exactly at the asked time: the row's own frame

    def as_json(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "file": str(self.path),
            "frame": self.record.body,
            "link": self.link.body if self.link is not None else None,
            "rows": [_row_json(row) for row in self.rows],
        }


def _row_json(row: Snapshot) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in ROW_FIELDS}
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}


def _starts_mid_connection(path: Path) -> bool:
    """Whether a file's first record restates an open connection (`resumed`)."""
    _, records = read_fixture(path)
    first = next(iter(records), None)
    return first is not None and first.kind == "link" and bool(first.body.get("resumed"))


def _files_to_read(root: Path, source: str, low: datetime, high: datetime) -> list[Path]:
    files = source_files(root, source)
    first_hour = low.replace(minute=0, second=0, microsecond=0)
    hours = [hour_of(path) for path in files]
    wanted = [i for i, hour in enumerate(hours) if hour is not None and first_hour <= hour <= high]
    if not wanted:
        return []
    start = wanted[0]
    while start > 0 and _starts_mid_connection(files[start]):
        start -= 1
    return files[start : wanted[-1] + 1]


def find_frames(
    root: Path, source: str, contract_key: str, at: datetime, window_s: float
) -> Iterator[FrameMatch]:
    """The frames of `source` received within `window_s` of `at` that yielded a row for
    `contract_key`, in the order received."""
    low, high = at - timedelta(seconds=window_s), at + timedelta(seconds=window_s)
    replayers, stats = Replayers(), ReplayStats()
    link: Record | None = None
    for path in _files_to_read(root, source, low, high):
        _, records = read_fixture(path)
        for record in records:
            if record.broker != source:
                continue
            if record.kind == "frame" and record.at > high:
                return
            rows = replayers.apply(record, stats)
            if record.kind == "link" and (link is None or not record.body.get("resumed")):
                link = record
            if record.kind != "frame" or record.at < low:
                continue
            mine = [row for row in rows if row.contract_key == contract_key]
            if mine:
                yield FrameMatch(path, record, link, mine, record.at == at)
