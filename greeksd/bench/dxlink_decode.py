"""Benchmark: DXLink FEED_DATA decoding, ours vs the tastytrade SDK, on the same frames.

The SDK (13.2.3, `DXLinkStreamer`) does `json.loads` on each frame, then for COMPACT data
`MAP_EVENTS[type].from_stream(data[1])`: pydantic `Greeks` objects. Ours: `parse` (orjson)
+ `decode_feed_data`, and separately + `SnapshotMapper.map` (events to rows). The frames
use the SDK's own field layout (what it asks for in FEED_SETUP), so both decode the
same bytes; 10 Greeks events per frame.
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
from greeksd.model import Contract

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


def our_decode_and_map(frames: list[str], mapper: dx.SnapshotMapper) -> int:
    layouts = {"Greeks": SDK_FIELDS}
    received_at = datetime.now(UTC)
    count = 0
    for frame in frames:
        message = dx.parse(frame)
        if message.__class__ is dx.FeedData:
            events, _ = dx.decode_feed_data(message.data, layouts)  # type: ignore[union-attr]
            rows, _ = mapper.map(events, received_at)
            count += len(rows)
    return count


def _best_of(repeats: int, fn: Callable[[], int]) -> tuple[int, float]:
    best = float("inf")
    count = 0
    for _ in range(repeats):
        started = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - started)
    return count, best


def run(events: int, repeats: int = 3) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    contracts = book(now)
    symbols = [dx.streamer_symbol(c.key) for c in contracts]
    start_ms = int(now.timestamp() * 1000)
    frames_sdk = [f for _, f in dxlink_frames(symbols, events, start_ms, SDK_FIELDS)]
    mapper = dx.SnapshotMapper()
    mapper.set_contracts(
        Contract(c.key, c.underlying, c.multiplier, c.quantity, "B") for c in contracts
    )
    cases: list[tuple[str, Callable[[], int]]] = [
        ("tastytrade SDK: json.loads + Greeks.from_stream", lambda: sdk_decode(frames_sdk)),
        ("greeksd: parse + decode_feed_data", lambda: our_decode(frames_sdk)),
        (
            "greeksd: parse + decode + SnapshotMapper.map",
            lambda: our_decode_and_map(frames_sdk, mapper),
        ),
    ]
    results = []
    sdk_us = None
    for name, fn in cases:
        count, seconds = _best_of(repeats, fn)
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
