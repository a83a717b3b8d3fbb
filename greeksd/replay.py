"""`greeksd replay`: a recorded fixture through the live code path, into the database.

Frames go through the same protocol code (each broker's `Connection`, fed by a
`ConnectionReplayer`), the same sink, the writer's
ordering policy and its idempotent COPY, as live data. Each broker's protocol state is
rebuilt from the fixture by its spec's replayer (greeksd.brokers.registry; records of a
broker without one are skipped and counted) exactly as the stream built it: a `link`
record starts a connection's state over (IBKR's merge book, DXLink's field layouts), a
`positions` record is what the stream tracked at that moment, and every row gets the
frame's recorded receive time. So a fixture always yields the same rows, and replaying
it again stores nothing new (every row comes back as a duplicate).

Unlike a websocket reader, replay may wait: it holds off when the writer falls behind,
so no row is ever conflated.

A replay is a bulk load: once every row is committed it compacts the indexes of the
daily partitions it loaded (greeksd.store.compaction.compact_loaded; GREEKSD_COMPACT_PARTITIONS),
as one builds an index after loading a table, instead of leaving them half full.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import trio

from greeksd import config, replay_parts
from greeksd.brokers import registry
from greeksd.brokers.link import Connection, Rejected
from greeksd.brokers.spec import ReplayCounts, Replayer
from greeksd.logs import get_logger
from greeksd.model import Snapshot, keeping_payload
from greeksd.pipeline import Pipeline, open_pipeline
from greeksd.recording import (
    Record,
    read_fixture,
)
from greeksd.sources import broker_of
from greeksd.store.compaction import compact_loaded
from greeksd.store.partitions import ensure_partitions

log = get_logger("greeksd.replay")

HIGH_WATER = 20_000  # rows handed over but not yet committed before replay waits
LOW_WATER = 5_000  # ... and how far the writer must catch up before it goes on
CHECKPOINT_EVERY = 64  # frames between yields, so the writer overlaps the parsing


@dataclass
class ReplayStats:
    frames: int = 0
    frames_by_broker: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    malformed: int = 0  # frames the protocol parser rejected
    rejected_events: int = 0  # parsed frames with events that could not be used
    links: int = 0
    position_updates: int = 0
    skipped_records: int = 0
    rejected_records: int = 0  # fixture lines that could not be read (logged, skipped)
    rows_written: int = 0
    duplicates: int = 0
    late: int = 0
    conflated: int = 0
    compacted: list[str] = field(default_factory=list)  # partitions whose indexes it rebuilt
    last: datetime | None = None  # the last record's time
    wall_s: float = 0.0
    compact_s: float = 0.0

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ReplayStats:
        """What `dataclasses.asdict` made of one, through JSON (a replay part's answer)."""
        last = obj.get("last")
        return cls(**{**obj, "last": datetime.fromisoformat(last) if last else None})

    def add(self, other: ReplayStats) -> None:
        """Count `other`'s part in (a parallel replay's parts, greeksd.replay_parts)."""
        for name, value in dataclasses.asdict(other).items():
            if name == "frames_by_broker":
                for broker, n in value.items():
                    self.frames_by_broker[broker] = self.frames_by_broker.get(broker, 0) + n
            elif name == "last":
                self.last = max(filter(None, (self.last, other.last)), default=None)
            elif name == "compacted":
                self.compacted += value
            else:
                setattr(self, name, getattr(self, name) + value)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        brokers = " ".join(f"{b}={n}" for b, n in sorted(self.frames_by_broker.items()))
        return (
            f"frames={self.frames} ({brokers}) links={self.links} "
            f"position_updates={self.position_updates} snapshots={self.snapshots} "
            f"written={self.rows_written} duplicates={self.duplicates} late={self.late} "
            f"malformed={self.malformed} rejected_events={self.rejected_events} "
            f"rejected_records={self.rejected_records} "
            f"conflated={self.conflated} wall_s={self.wall_s:.2f} "
            f"compacted={','.join(self.compacted) or '-'} compact_s={self.compact_s:.2f} "
            f"frames_per_s={self.frames_per_s:,.0f}"
        )


class ConnectionReplayer:
    """A broker's `Connection` fed a recording as its link runner fed it live: a `link`
    record starts a new Connection, a `positions` record is what it tracked, a frame is
    received at its recorded time. What it asks to send, call or log is ignored (the
    recording holds the server's answers), and its timers never run: a deadline that
    fired live shows in the recording as the link record that followed."""

    def __init__(
        self,
        connect: Callable[[Mapping[str, Any]], Connection],
        decode_positions: Callable[[Mapping[str, Any]], Any],
    ) -> None:
        self.connect = connect
        self.decode_positions = decode_positions
        self.conn = connect({})

    def link(self, record: Record) -> None:
        self.conn = self.connect(record.body)
        self.conn.start(_clock(record), record.at)

    def positions(self, record: Record) -> None:
        self.conn.set_positions(self.decode_positions(record.body), _clock(record), record.at)

    def frame(self, record: Record, stats: ReplayCounts) -> list[Snapshot]:
        rows: list[Snapshot] = []
        for event in self.conn.receive(record.data, _clock(record), record.at):
            if event.__class__ is Snapshot:
                rows.append(event)  # type: ignore[arg-type]
            elif isinstance(event, Rejected):
                if event.kind == "malformed_frame":
                    stats.malformed += 1
                else:
                    stats.rejected_events += 1
        return rows


def _clock(record: Record) -> float:
    """The Connection's monotonic clock in replay: the recorded time."""
    return record.at.timestamp()


class Replayers:
    """Each source's protocol state, rebuilt record by record; one place that knows what
    a record kind means, for replay and for the benchmarks that decode fixtures. A
    record's `broker` is the stream that recorded it (a source name, greeksd.sources:
    `ibkr`, or `ibkr:alice` when one instance ran several IBKR logins), so each source
    gets its own replayer and its rows their `source`, as live.

    A `link` or `positions` record marked `resumed` restates, at the top of an archive
    hour file (greeksd.archive), a connection that was already open: it is applied only
    when the replay starts there (no link of that source seen yet), and ignored when the
    replay has read the connection's real start, whose state it already holds."""

    def __init__(self) -> None:
        self._by_broker: dict[str, Replayer] = {}
        self._linked: set[str] = set()

    def apply(self, record: Record, stats: ReplayStats) -> list[Snapshot]:
        """Apply one record (counted in `stats`); returns the rows a frame yields."""
        replayer = self._by_broker.get(record.broker)
        if replayer is None:
            spec = registry.get(broker_of(record.broker))
            if spec is None or spec.replayer is None:
                stats.skipped_records += 1
                log.warning("replay_unknown_broker", broker=record.broker)
                return []
            replayer = self._by_broker[record.broker] = spec.replayer()
        if record.kind == "frame":
            stats.frames += 1
            stats.frames_by_broker[record.broker] = stats.frames_by_broker.get(record.broker, 0) + 1
            rows = replayer.frame(record, stats)
            for row in rows:
                row.source = record.broker
            return rows
        if record.body.get("resumed") and record.broker in self._linked:
            return []
        if record.kind == "positions":
            stats.position_updates += 1
            replayer.positions(record)
        elif record.kind == "link":
            stats.links += 1
            self._linked.add(record.broker)
            replayer.link(record)
        else:
            stats.skipped_records += 1
            log.warning("replay_unknown_record", kind=record.kind)
        return []


def _prepare_partitions(url: str, first: datetime) -> None:
    """Daily partitions for the fixture's day (and the next, for a session that crosses
    midnight); later days still land in the default partition."""
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_partitions(conn, first.date(), 1)


def _compact(url: str, first: datetime, last: datetime, rows: int) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")  # a rebuild takes what the partition needs
        done = compact_loaded(conn, first.date(), last.date(), rows, config.DB_TIMEOUT_S)
    return [c.partition for c in done]


async def replay_fixture(
    url: str,
    path: Path,
    *,
    speed: float = 0.0,
    flush_rows: int = config.FLUSH_ROWS,
    flush_ms: int = config.FLUSH_MS,
    instance: str | None = None,
    store_payload: bool = config.STORE_PAYLOAD,
    compact: bool = config.COMPACT_PARTITIONS,
    processes: int = replay_parts.AUTO,
    stop: trio.Event | None = None,
) -> ReplayStats:
    """Replay `path` into the database at `url` (migrated). `speed` 0 = as fast as
    possible, 1 = the recorded pacing, 2 = twice as fast. Rows name `instance` as the
    instance that wrote them; `store_payload`: GREEKSD_STORE_PAYLOAD; `compact`:
    GREEKSD_COMPACT_PARTITIONS. At full speed the sources are split over up to
    `processes` processes (greeksd.replay_parts; AUTO: one per CPU for a large
    fixture, 1: this one only). Setting `stop` ends the reading early (in every part);
    what was handed to the writers is still committed, and nothing is compacted.
    Returns once every row is committed (and the loaded partitions compacted)."""
    if stop is None:
        stop = trio.Event()
    header, fixture = read_fixture(path)
    records = fixture.__iter__()  # (a generator: closing it closes the file)
    first = next(records, None)
    records.close()
    started = time.perf_counter()
    if first is None:
        return ReplayStats(rejected_records=fixture.rejected)
    await trio.to_thread.run_sync(_prepare_partitions, url, first.at)
    options = replay_parts.PartOptions(flush_rows, flush_ms, instance, store_payload)
    size = (await trio.Path(path).stat()).st_size
    parts = replay_parts.plan(header, size, processes) if speed == 0 else []
    if len(parts) > 1:
        stats = await _load_parts(url, path, parts, options, stop)
    else:
        stats = await load_part(url, path, None, options, stop, speed)
    stats.wall_s = time.perf_counter() - started  # the load, which the benchmarks time
    if compact and stats.rows_written and stats.last is not None and not stop.is_set():
        compacting = time.perf_counter()
        stats.compacted = await trio.to_thread.run_sync(
            _compact, url, first.at, stats.last, stats.rows_written
        )
        stats.compact_s = time.perf_counter() - compacting
    log.info("replay_finished", fixture=str(path), **_log_fields(stats))
    return stats


async def _load_parts(
    url: str,
    path: Path,
    parts: list[replay_parts.SourcePart],
    options: replay_parts.PartOptions,
    stop: trio.Event,
) -> ReplayStats:
    """Part 0 here, the others in child processes, all at once; their stats added up."""
    results: list[ReplayStats] = []

    async def child(part: replay_parts.SourcePart) -> None:
        answer = await replay_parts.run_child(url, path, part, options, stop)
        results.append(ReplayStats.from_json(answer))

    async with trio.open_nursery() as nursery:
        for part in parts[1:]:
            nursery.start_soon(child, part)
        log.info(
            "replay_parts_started",
            fixture=str(path),
            parts=len(parts),
            sources=" | ".join(p.describe() for p in parts),
        )
        stats = await load_part(url, path, parts[0], options, stop)
    for result in results:
        stats.add(result)
    return stats


async def load_part(
    url: str,
    path: Path,
    part: replay_parts.SourcePart | None,
    options: replay_parts.PartOptions,
    stop: trio.Event,
    speed: float = 0.0,
) -> ReplayStats:
    """Replay `part`'s records (all, when None) through one pipeline; setting `stop`
    ends the reading early, and what was handed over is still committed. The caller has
    prepared the partitions."""
    _, fixture = read_fixture(path, part)
    stats = ReplayStats()
    async with open_pipeline(
        url,
        flush_rows=options.flush_rows,
        flush_ms=options.flush_ms,
        queue_size=HIGH_WATER * 2,
        # rows keep their recorded receive time, so "write latency" is the fixture's
        # age: no SLO to check
        slo_ms=sys.maxsize,
        instance=options.instance,
        store_payload=options.store_payload,
    ) as pipeline:
        with keeping_payload(options.store_payload):
            async with trio.open_nursery() as reading:

                async def on_stop() -> None:
                    await stop.wait()
                    reading.cancel_scope.cancel()

                reading.start_soon(on_stop)
                await _feed(iter(fixture), pipeline, stats, speed)
                reading.cancel_scope.cancel()
    writer = pipeline.writer.stats
    stats.rows_written, stats.duplicates, stats.late = (
        writer.rows_written,
        writer.duplicates,
        writer.late,
    )
    stats.conflated = pipeline.sink.conflated
    stats.rejected_records = fixture.rejected
    return stats


def _log_fields(stats: ReplayStats) -> dict[str, Any]:
    return {
        "frames": stats.frames,
        "snapshots": stats.snapshots,
        "written": stats.rows_written,
        "duplicates": stats.duplicates,
        "malformed": stats.malformed,
        "frames_per_s": round(stats.frames_per_s),
    }


async def _feed(
    records: Iterator[Record], pipeline: Pipeline, stats: ReplayStats, speed: float
) -> None:
    """Hand every record's rows to the sink; `stats.last` follows the records."""
    sink, writer = pipeline.sink, pipeline.writer
    replayers = Replayers()
    origin: datetime | None = None
    clock_origin = trio.current_time()
    for record in records:
        if speed > 0:
            origin = origin or record.at
            await trio.sleep_until(clock_origin + (record.at - origin).total_seconds() / speed)
        frames = stats.frames
        stats.last = record.at
        for row in replayers.apply(record, stats):
            sink.put(row)
            stats.snapshots += 1
        if stats.frames != frames and stats.frames % CHECKPOINT_EVERY == 0:
            await trio.lowlevel.checkpoint()
            settled = writer.stats.rows_written + writer.stats.duplicates
            if sink.accepted - settled > HIGH_WATER:
                await writer.wait_settled(sink.accepted - LOW_WATER)
