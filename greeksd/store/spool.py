"""The disk spool: where accepted batches wait while the database is unreachable.

An append-only file of checksummed records, one record per batch, fsync'd before the
writer moves on, so a batch handed to the spool survives a crash or kill -9. Records are
replayed in order once the database is back; because the writer's insert is idempotent,
a crash between a replayed COPY and the truncation of the spool is harmless.

Record layout: MAGIC (4 bytes) | payload length (u32 BE) | crc32 of payload (u32 BE) |
payload (orjson of a list of snapshot dicts). A torn last record (crash mid-append) is
cut off on open; a record that fails its checksum elsewhere is moved to a
`.corrupt` file and counted, never silently dropped.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from greeksd.logs import get_logger
from greeksd.model import Broker, OptionRight, Snapshot

log = get_logger("greeksd.spool")

MAGIC = b"GSP1"
_HEADER = struct.Struct(">4sII")


class SpoolFull(RuntimeError):
    """Appending would pass the size cap."""


def snapshot_to_dict(s: Snapshot) -> dict[str, Any]:
    """Exact, typed encoding: Decimals and dates as strings, datetimes with offsets."""
    return {
        "broker": s.broker.value,
        "account_id": s.account_id,
        "contract_key": s.contract_key,
        "underlying": s.underlying,
        "expiration": s.expiration.isoformat(),
        "strike": str(s.strike),
        "option_type": s.option_type.value,
        "multiplier": None if s.multiplier is None else str(s.multiplier),
        "quantity": None if s.quantity is None else str(s.quantity),
        "delta": s.delta,
        "gamma": s.gamma,
        "theta": s.theta,
        "vega": s.vega,
        "rho": s.rho,
        "implied_volatility": s.implied_volatility,
        "underlying_price": s.underlying_price,
        "bid": s.bid,
        "ask": s.ask,
        "last": s.last,
        "mark": s.mark,
        "event_time": s.event_time.isoformat(),
        "received_at": s.received_at.isoformat(),
        "source_payload": s.source_payload,
        "market_data": s.market_data,
    }


def _decimal(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def snapshot_from_dict(d: dict[str, Any]) -> Snapshot:
    return Snapshot(
        broker=Broker(d["broker"]),
        account_id=d["account_id"],
        contract_key=d["contract_key"],
        underlying=d["underlying"],
        expiration=date.fromisoformat(d["expiration"]),
        strike=Decimal(d["strike"]),
        option_type=OptionRight(d["option_type"]),
        multiplier=_decimal(d["multiplier"]),
        quantity=_decimal(d["quantity"]),
        delta=d["delta"],
        gamma=d["gamma"],
        theta=d["theta"],
        vega=d["vega"],
        rho=d["rho"],
        implied_volatility=d["implied_volatility"],
        underlying_price=d["underlying_price"],
        bid=d["bid"],
        ask=d["ask"],
        last=d["last"],
        mark=d["mark"],
        event_time=datetime.fromisoformat(d["event_time"]),
        received_at=datetime.fromisoformat(d["received_at"]),
        source_payload=d["source_payload"],
        market_data=d.get("market_data"),  # absent in records spooled before 003
    )


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.corrupt_records = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, batch: Sequence[Snapshot]) -> None:
        """Durably add one batch (fsync'd before returning). Raises SpoolFull."""
        payload = orjson.dumps(
            [{k: _finite_or_none(v) for k, v in snapshot_to_dict(s).items()} for s in batch],
            option=orjson.OPT_NON_STR_KEYS,
        )
        record = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        if self.size + len(record) > self.max_bytes:
            raise SpoolFull(
                f"spool {self.path} would exceed GREEKSD_SPOOL_MAX_MB "
                f"({self.max_bytes // (1024 * 1024)} MiB)"
            )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)

    def batches(self) -> Iterator[list[Snapshot]]:
        """Every intact batch, oldest first; a corrupt record goes to `.corrupt`."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            while header := f.read(_HEADER.size):
                if len(header) < _HEADER.size:
                    return
                magic, length, crc = _HEADER.unpack(header)
                payload = f.read(length) if magic == MAGIC else b""
                if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                    self._quarantine(header + payload + f.read())
                    return
                yield [snapshot_from_dict(d) for d in orjson.loads(payload)]

    def clear(self) -> None:
        """Everything in the spool is in the database: start empty."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _quarantine(self, data: bytes) -> None:
        self.corrupt_records += 1
        corrupt = self.path.with_suffix(self.path.suffix + ".corrupt")
        with corrupt.open("ab") as f:
            f.write(data)
        log.error(
            "spool_record_corrupt", spool=str(self.path), moved_to=str(corrupt), bytes=len(data)
        )

    def _cut_torn_tail(self) -> None:
        """A crash during append can leave a partial last record: cut it so later
        appends stay readable."""
        if not self.path.exists():
            return
        good = 0
        with self.path.open("rb") as f:
            while header := f.read(_HEADER.size):
                if len(header) < _HEADER.size:
                    break
                magic, length, crc = _HEADER.unpack(header)
                payload = f.read(length)
                if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                    break
                good = f.tell()
        if good < self.size:
            with self.path.open("rb") as f:
                f.seek(good)
                self._quarantine(f.read())
            os.truncate(self.path, good)
            log.warning("spool_torn_tail_cut", spool=str(self.path), kept_bytes=good)
