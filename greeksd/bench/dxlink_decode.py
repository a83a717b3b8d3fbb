"""Benchmark: DXLink FEED_DATA decoding, ours vs the tastytrade SDK, on the same frames.

The SDK (13.2.3, `DXLinkStreamer`) does `json.loads` on each frame, then for COMPACT data
`MAP_EVENTS[type].from_stream(data[1])`: pydantic `Greeks` objects, one per event. Ours:
`parse` (orjson) + `greeks_columns`, the tick path's decode: each field of a COMPACT
Greeks group as one typed, checked column (what the SDK's objects hold, without an object
per event); `parse` + `SnapshotMapper.feed_rows`, that decode joined with the held
contracts into one `Snapshot` row per event (every symbol held, with payloads off as by
default; the normalization the SDK does not do); `parse`
+ `decode_feed_data`, the per-event dicts that FULL data and kept payloads still use;
and the whole tick path, `DxlinkConnection.receive` (the Connection's bookkeeping and
coverage around `feed_rows`, as the stream and replay run it). The frames use the SDK's
own field layout (what it asks for in FEED_SETUP, announced to our Connection by a
FEED_CONFIG), so all decode the same bytes; 10 Greeks events per frame.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tastytrade.dxfeed import Greeks

from greeksd.bench.fixture import book, dxlink_frames
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.connection import DxlinkConnection
from greeksd.model import Contract, keeping_payload

SDK_FIELDS = tuple(f.alias or k for k, f in Greeks.model_fields.items())


def sdk_decode(frames: list[str]) -> int:
    """Exactly the SDK's path for a FEED_DATA frame (receive_json + _map_message)."""
    count = 0
    for frame in frames:
        message = json.loads(frame)
        if message["type"] == "FEED_DATA":
            data = message["data"]
            count += len(Greeks.from_stream(data[1]))
    return count


def our_decode(frames: list[str]) -> int:
    layouts = {"Greeks": SDK_FIELDS}
    count = 0
    for frame in frames:
        message = dx.parse(frame)
        if message.__class__ is dx.FeedData:
            events, _ = dx.decode_feed_data(message.data, layouts)  # type: ignore[union-attr]
            count += len(events)
    return count


def our_columns(frames: list[str]) -> int:
    """The tick path's decode alone: COMPACT groups to typed, checked columns
    (`greeks_columns`), the stage `feed_rows` then joins with the held contracts."""
    layouts = {"Greeks": SDK_FIELDS}
    count = 0
    problems: list[str] = []
    for frame in frames:
        message = dx.parse(frame)
        if message.__class__ is dx.FeedData:
            for _, values, names in dx.compact_groups(message.data, layouts, problems):  # type: ignore[union-attr]
                columns = dx.greeks_columns(values, names)
                assert columns is not None, "the bench's frames take the column path"
                count += len(columns[0])  # type: ignore[arg-type]
    return count


def our_feed_rows(frames: list[str], contracts: list[Contract]) -> int:
    layouts = {"Greeks": SDK_FIELDS}
    received_at = datetime.now(UTC)
    mapper = dx.SnapshotMapper()
    mapper.set_contracts(contracts)
    count = 0
    with keeping_payload(False):
        for frame in frames:
            message = dx.parse(frame)
            if message.__class__ is dx.FeedData:
                rows, _ = mapper.feed_rows(message.data, layouts, received_at)  # type: ignore[union-attr]
                count += len(rows)
    return count


def our_rows(frames: list[str], contracts: list[Contract]) -> int:
    """The stream's tick path: each frame through a Connection holding `contracts`."""
    received_at = datetime.now(UTC)
    conn = DxlinkConnection("", positions=dx.Positions(contracts))
    conn.start(0.0, received_at)
    sdk_layout = dx.FeedConfig(1, "COMPACT", 0.1, {"Greeks": SDK_FIELDS})
    conn.receive(dx.build(sdk_layout), 0.0, received_at)
    count = 0
    with keeping_payload(False):
        for frame in frames:
            count += len(conn.receive(frame, 0.0, received_at))
    return count


Case = tuple[str, Callable[[], int]]


def _best_of(repeats: int, cases: list[Case]) -> dict[str, tuple[int, float]]:
    """Each case's event count and best time of `repeats`, the cases taking turns round
    after round: a slow spell of a shared machine then slows every decoder's round, not
    one decoder's every try, and the best of each is from the same quiet moments."""
    best: dict[str, tuple[int, float]] = {name: (0, float("inf")) for name, _ in cases}
    for _ in range(repeats):
        for name, fn in cases:
            started = time.perf_counter()
            count = fn()
            best[name] = (count, min(best[name][1], time.perf_counter() - started))
    return best


def run(events: int, repeats: int = 5) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    contracts = book(now)
    symbols = [dx.streamer_symbol(c.key) for c in contracts]
    start_ms = int(now.timestamp() * 1000)
    frames_sdk = [f for _, f in dxlink_frames(symbols, events, start_ms, SDK_FIELDS)]
    held = [Contract(c.key, c.underlying, c.multiplier, c.quantity, "B") for c in contracts]
    cases: list[Case] = [
        ("tastytrade SDK: json.loads + Greeks.from_stream", lambda: sdk_decode(frames_sdk)),
        ("greeksd: parse + greeks_columns (typed)", lambda: our_columns(frames_sdk)),
        ("greeksd: parse + feed_rows (to rows)", lambda: our_feed_rows(frames_sdk, held)),
        ("greeksd: parse + decode_feed_data (dicts)", lambda: our_decode(frames_sdk)),
        ("greeksd: DxlinkConnection.receive (to rows)", lambda: our_rows(frames_sdk, held)),
    ]
    results = []
    sdk_us = None
    for name, (count, seconds) in _best_of(repeats, cases).items():
        per_event_us = seconds / count * 1e6
        sdk_us = sdk_us or per_event_us
        results.append(
            {
                "decoder": name,
                "events": count,
                "us_per_event": round(per_event_us, 3),
                "events_per_s": round(count / seconds),
                "speedup_vs_sdk": round(sdk_us / per_event_us, 2),
            }
        )
    return results
