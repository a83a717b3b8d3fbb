"""Fixtures: every raw frame a broker stream receives, as one JSON line per frame.

A fixture is what `greeksd record` writes and `greeksd replay` reads: inbound websocket
frames with the time they were read off the socket, the positions the stream subscribed
(as it planned them), and a marker at each new connection, because protocol state
(IBKR's per-conid merge, DXLink's field layouts) starts over there. That is exactly what
the protocol modules need to rebuild every row the live run wrote, byte for byte.

Lines (`.jsonl`, or `.jsonl.gz`; the first line is the header):

    {"fixture": "greeksd", "version": 1, "recorded_at": ISO, "brokers": [...]}
    {"t": ISO, "b": "ibkr", "k": "link", "max_lines": 100}       # new connection
    {"t": ISO, "b": "tastytrade", "k": "link", "channel": 1}
    {"t": ISO, "b": "ibkr", "k": "positions", "positions": [...], "lines": [conid, ...]}
    {"t": ISO, "b": "tastytrade", "k": "positions", "positions": [...]}
    {"t": ISO, "b": "ibkr", "k": "frame", "d": "<text frame>"}
    {"t": ISO, "b": "ibkr", "k": "frame", "bin": "<base64 of a binary frame>"}

Secrets never go in: only inbound frames are recorded (never our AUTH, cookies or the
IBKR session), registered secrets are masked in every frame, and an AUTH-shaped frame's
`token` is replaced.
"""

from __future__ import annotations

import base64
import gzip
import math
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import trio

from greeksd.brokers.ibkr.protocol import OptionPosition
from greeksd.logs import get_logger
from greeksd.model import (
    Contract,
    ContractKey,
    Recorder,
    Snapshot,
    SnapshotSink,
    Source,
    StreamStatus,
    Trade,
)
from greeksd.redact import redact
from greeksd.supervisor import Supervisor

FORMAT = "greeksd"
VERSION = 1
REDACTED = "***"

log = get_logger("greeksd.recording")


def open_text(path: Path, mode: str) -> IO[str]:
    """`.gz` through gzip (stdlib: no dependency), anything else as plain text."""
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="\n")  # type: ignore[return-value]
    return path.open(mode, encoding="utf-8", newline="\n")


# ---- positions as JSON ---------------------------------------------------------------
def contract_json(c: Contract) -> dict[str, Any]:
    return {
        "key": c.key_text,
        "underlying": c.underlying,
        "multiplier": str(c.multiplier),
        "quantity": str(c.quantity),
        "account_id": c.account_id,
    }


def contract_from_json(obj: dict[str, Any]) -> Contract:
    return Contract(
        ContractKey.parse(obj["key"]),
        obj["underlying"],
        Decimal(obj["multiplier"]),
        Decimal(obj["quantity"]),
        obj["account_id"],
    )


def position_json(position: Contract | OptionPosition) -> dict[str, Any]:
    if isinstance(position, OptionPosition):
        return {
            "conid": position.conid,
            "und_conid": position.und_conid,
            **contract_json(position.contract),
        }
    return contract_json(position)


def option_position_from_json(obj: dict[str, Any]) -> OptionPosition:
    return OptionPosition(obj["conid"], obj["und_conid"], contract_from_json(obj))


# ---- frames --------------------------------------------------------------------------
def scrub(text: str) -> str:
    """No secret in a fixture: registered secrets masked, an AUTH frame's token replaced
    (only a frame that mentions a token is parsed, so this costs nothing per data frame)."""
    text = redact(text)
    if '"token"' in text:
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
        if isinstance(obj, dict) and "token" in obj:
            obj["token"] = REDACTED
            return orjson.dumps(obj).decode()
    return text


def fixture_header(brokers: Sequence[str], recorded_at: datetime) -> dict[str, Any]:
    """The first line of every fixture: what `read_fixture` checks before reading on."""
    return {
        "fixture": FORMAT,
        "version": VERSION,
        "recorded_at": recorded_at.isoformat(),
        "brokers": list(brokers),
    }


def link_record(broker: str, at: datetime, details: Mapping[str, Any]) -> dict[str, Any]:
    """A `link` line: a new connection of `broker` (the stream's source name)."""
    return {"t": at.isoformat(), "b": broker, "k": "link", **details}


def positions_record(
    broker: str, positions: Sequence[Any], at: datetime, details: Mapping[str, Any]
) -> dict[str, Any]:
    """A `positions` line: what the stream tracks from now on."""
    record = {"t": at.isoformat(), "b": broker, "k": "positions"}
    return record | {"positions": [position_json(p) for p in positions], **details}


def frame_record(broker: str, data: str | bytes, received_at: datetime) -> dict[str, Any]:
    """A `frame` line: text scrubbed of secrets, binary as base64."""
    record: dict[str, Any] = {"t": received_at.isoformat(), "b": broker, "k": "frame"}
    if isinstance(data, str):
        record["d"] = scrub(data)
    else:
        record["bin"] = base64.b64encode(data).decode("ascii")
    return record


class FixtureWriter:
    """A `Recorder` writing a fixture file; use as a context manager."""

    def __init__(self, path: Path, brokers: Sequence[str]) -> None:
        self.path = path
        self.brokers = list(brokers)
        self.counts: dict[str, int] = {}
        self._out: IO[str] | None = None

    def __enter__(self) -> FixtureWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open_text(self.path, "w")
        self._write(fixture_header(self.brokers, datetime.now(UTC)))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _write(self, record: dict[str, Any]) -> None:
        assert self._out is not None, "FixtureWriter used outside `with`"
        self._out.write(orjson.dumps(record).decode())
        self._out.write("\n")

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def link(self, broker: str, at: datetime, **details: Any) -> None:
        self._count("link")
        self._write(link_record(broker, at, details))

    def positions(
        self, broker: str, positions: Sequence[Any], at: datetime, **details: Any
    ) -> None:
        self._count("positions")
        self._write(positions_record(broker, positions, at, details))

    def frame(self, broker: str, data: str | bytes, received_at: datetime) -> None:
        self._count("frame")
        self._write(frame_record(broker, data, received_at))


class FanOut:
    """A `Recorder` telling several: the service's archive and, on the same stream, a
    fixture being recorded. Each is called in order, synchronously, like one recorder."""

    def __init__(self, *recorders: Recorder) -> None:
        self.recorders = recorders

    def link(self, broker: str, at: datetime, **details: Any) -> None:
        for recorder in self.recorders:
            recorder.link(broker, at, **details)

    def positions(
        self, broker: str, positions: Sequence[Any], at: datetime, **details: Any
    ) -> None:
        for recorder in self.recorders:
            recorder.positions(broker, positions, at, **details)

    def frame(self, broker: str, data: str | bytes, received_at: datetime) -> None:
        for recorder in self.recorders:
            recorder.frame(broker, data, received_at)


# ---- reading -------------------------------------------------------------------------
class FixtureError(ValueError):
    """Not a greeksd fixture, or a line that cannot be read; says which line."""


@dataclass(slots=True)
class Record:
    """One fixture line. Not frozen: one is made per frame read, where a frozen
    dataclass's `__init__` (a `object.__setattr__` call per field) costs ~0.3 µs more;
    nothing assigns to one (and its dict body never made it hashable).

    `data` is a frame's text, or its binary frame decoded (`frame_data`), taken out of
    the body once as the line is read: reading needs it to validate the line anyway, and
    a property would decode it a second time in replay. Other records have none ('')."""

    at: datetime
    broker: str
    kind: str
    body: dict[str, Any]
    data: str | bytes = ""


def frame_data(body: Mapping[str, Any]) -> str | bytes:
    """A frame line's data: `bin` base64-decoded, else `d` as it is. Raises KeyError
    (neither), binascii.Error (a ValueError) or TypeError (a `bin` that is no text)."""
    if "bin" in body:
        return base64.b64decode(body["bin"])
    text: str = body["d"]
    return text


class FixtureRecords:
    """The records of a fixture in file order, read lazily (fixtures may be large). A line
    that cannot be read is logged with its line number and reason, counted in
    `rejected`, and skipped: one damaged line must not cost the rest of a recording.

    Two things an archive file (greeksd.archive) may hold are read as such: another
    header line (fixtures concatenated with `cat`, e.g. consecutive hour files) is
    skipped, and a compressed tail cut short by a crash ends the records with a
    `fixture_truncated` warning (counted in `rejected`) instead of an error.

    `part` keeps only the records of some sources (a parallel replay's share,
    greeksd.replay_parts); lines that cannot be read are then logged and counted by the
    part that `reports_damage` only, so each is reported once across the processes."""

    def __init__(self, path: Path, f: IO[str], part: RecordFilter | None = None) -> None:
        self.path = path
        self._f = f
        self._part = part
        self._reports = part is None or part.reports_damage
        self.rejected = 0

    def _reject(self, event: str, **fields: Any) -> None:
        if self._reports:
            self.rejected += 1
            log.warning(event, fixture=str(self.path), **fields)

    def _lines(self) -> Iterator[str]:
        try:
            yield from self._f
        except (EOFError, OSError) as exc:  # gzip: a member cut short, or garbage after it
            self._reject("fixture_truncated", reason=f"{type(exc).__name__}: {exc}"[:200])

    def __iter__(self) -> Generator[Record, None, None]:
        keeps = None if self._part is None else self._part.keeps
        with self._f:
            for number, line in enumerate(self._lines(), start=2):
                try:
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        if not line.strip():  # (tested only here: no copy of every line)
                            continue
                        raise
                    if isinstance(obj, dict) and obj.get("fixture") == FORMAT:
                        continue  # the header of a fixture concatenated to this one
                    if keeps is not None and not keeps(obj["b"]):
                        continue  # another part's source
                    at = datetime.fromisoformat(obj["t"])
                    if at.tzinfo is None or not isinstance(obj["b"], str):
                        raise ValueError("needs an aware time and a broker name")
                    kind = str(obj["k"])
                    record = Record(at, obj["b"], kind, obj)
                    if kind == "frame":
                        record.data = frame_data(obj)  # validated now, not mid-replay
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    self._reject(
                        "fixture_record_rejected",
                        line=number,
                        reason=f"{type(exc).__name__}: {exc}"[:200],
                    )
                    continue
                yield record


class RecordFilter(Protocol):
    """Which sources' records a reader keeps (greeksd.replay_parts.SourcePart)."""

    @property
    def reports_damage(self) -> bool: ...

    def keeps(self, source: Any) -> bool: ...


def read_fixture(
    path: Path, part: RecordFilter | None = None
) -> tuple[dict[str, Any], FixtureRecords]:
    """The header, and the records (only `part`'s, when given). Raises FixtureError when
    `path` is not a fixture."""
    f = open_text(path, "r")
    try:
        first = f.readline()
        header = orjson.loads(first) if first.strip() else None
    except (orjson.JSONDecodeError, UnicodeDecodeError, OSError, EOFError):
        header = None
    if not isinstance(header, dict) or header.get("fixture") != FORMAT:
        f.close()
        raise FixtureError(f"{path}: not a greeksd fixture (no header line)")
    if header.get("version") != VERSION:
        f.close()
        raise FixtureError(f"{path}: fixture version {header.get('version')} is not {VERSION}")
    return header, FixtureRecords(path, f, part)


# ---- recording a session -------------------------------------------------------------
class CountingSink:
    """`greeksd record` needs no database: rows are counted (the fixture holds the
    frames they came from) and dropped."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.trades = 0

    def put(self, snapshot: Snapshot) -> None:
        source = snapshot.source or snapshot.broker
        self.rows[source] = self.rows.get(source, 0) + 1

    def put_trade(self, trade: Trade) -> None:
        self.trades += 1


async def record_session(
    open_sources: Callable[[Recorder], Sequence[Source]],
    out: Path,
    brokers: Sequence[str],
    *,
    duration_s: float | None = None,
    sink: SnapshotSink | None = None,
) -> tuple[dict[str, int], dict[str, StreamStatus]]:
    """Run the sources `open_sources` builds around the fixture's recorder (supervised,
    restarted like in the service) into `sink` (default: a `CountingSink`) while they
    record `brokers` to `out`, for `duration_s` or until cancelled. Returns the record
    counts and the streams' final status."""
    supervisor = Supervisor(sink if sink is not None else CountingSink())
    with FixtureWriter(out, brokers) as recorder:
        for source in open_sources(recorder):
            supervisor.add(source)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await trio.sleep(duration_s if duration_s else math.inf)
            nursery.cancel_scope.cancel()
    return recorder.counts, dict(supervisor.registry)
