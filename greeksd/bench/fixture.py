"""A large synthetic fixture for the throughput benchmarks, in the greeksd fixture format.

The committed fixture holds ~3k snapshots: too few to time a pipeline that moves tens of
thousands per second. This writes the same kind of records (link, positions, frames) with
the simulators' own frame builders (greeksd.sim), so replay decodes them exactly like
frames from the simulated servers.
Every event gets its own millisecond, so no row is a duplicate of another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from greeksd.brokers import registry
from greeksd.brokers.ibkr import protocol as ib
from greeksd.brokers.spec import BenchEntry
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.model import Contract
from greeksd.recording import contract_json, fixture_header
from greeksd.sim import dxlink_wire, ibkr_wire
from greeksd.sim.dxlink_server import greeks_event
from greeksd.sim.market import SimContract, default_contracts

BOOK_SIZE = 50
DX_EVENTS_PER_FRAME = 10  # a burst, as the DXLink server aggregates them


def book(as_of: datetime) -> list[SimContract]:
    return default_contracts(as_of.date(), BOOK_SIZE)


def _contract(c: SimContract) -> Contract:
    return Contract(c.key, c.underlying, c.multiplier, c.quantity, "BENCH")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def ibkr_records(
    contracts: Sequence[SimContract], count: int, start_ms: int
) -> Iterator[dict[str, Any]]:
    conids = list(range(700000001, 700000001 + len(contracts)))
    positions = [
        {"conid": conid, "und_conid": 900001, **contract_json(_contract(c))}
        for conid, c in zip(conids, contracts, strict=True)
    ]
    yield {"t": _iso(start_ms), "b": "ibkr", "k": "link"}
    yield {
        "t": _iso(start_ms),
        "b": "ibkr",
        "k": "positions",
        "positions": positions,
        "lines": conids,
    }
    yield {
        "t": _iso(start_ms),
        "b": "ibkr",
        "k": "frame",
        "d": ibkr_wire.market_data(900001, {ib.LAST: "190.25"}, start_ms),
    }
    for i in range(count):
        ms = start_ms + i
        values = {
            ib.BID: f"{1 + i % 97 / 100:.2f}",
            ib.ASK: f"{1.1 + i % 97 / 100:.2f}",
            ib.MARK: f"{1.05 + i % 97 / 100:.3f}",
            ib.DELTA: f"{0.3 + i % 1000 / 5000:.4f}",
            ib.GAMMA: f"{0.01 + i % 100 / 10000:.5f}",
            ib.THETA: f"{-0.05 - i % 100 / 10000:.4f}",
            ib.VEGA: f"{0.2 + i % 100 / 10000:.4f}",
            ib.IV: f"{25 + i % 100 / 10:.1f}%",
        }
        frame = ibkr_wire.market_data(conids[i % len(conids)], values, ms)
        yield {"t": _iso(ms), "b": "ibkr", "k": "frame", "d": frame}


def _greeks(symbol: str, ms: int, i: int) -> dict[str, Any]:
    """One Greeks event with every field (so any layout, ours or the SDK's, finds its own)."""
    return greeks_event(
        symbol,
        ms,
        index=ms << 22,
        price=4.2 + i % 97 / 100,
        volatility=0.27 + i % 13 / 1000,
        delta=0.41 + i % 1000 / 10000,
        gamma=0.012,
        theta=-0.05,
        rho=0.08,
        vega=0.19 + i % 7 / 100,
    )


def dxlink_frames(
    symbols: list[str], count: int, start_ms: int, fields: tuple[str, ...] = dx.GREEKS_FIELDS
) -> Iterator[tuple[int, str]]:
    """(time ms, FEED_DATA frame) with `DX_EVENTS_PER_FRAME` Greeks events each."""
    for first in range(0, count, DX_EVENTS_PER_FRAME):
        events = [
            _greeks(symbols[i % len(symbols)], start_ms + i, i)
            for i in range(first, min(count, first + DX_EVENTS_PER_FRAME))
        ]
        data = dxlink_wire.compact([("Greeks", fields, events)])
        yield start_ms + first, dxlink_wire.encode(dxlink_wire.feed_data(1, data))


def dxlink_records(
    contracts: Sequence[SimContract], count: int, start_ms: int
) -> Iterator[dict[str, Any]]:
    positions = [contract_json(_contract(c)) for c in contracts]
    yield {"t": _iso(start_ms), "b": "tastytrade", "k": "link", "channel": 1}
    yield {"t": _iso(start_ms), "b": "tastytrade", "k": "positions", "positions": positions}
    underlying = contracts[0].underlying
    quote = {"eventType": "Quote", "eventSymbol": underlying, "bidPrice": 190.2, "askPrice": 190.3}
    data = dxlink_wire.compact([("Quote", dx.QUOTE_FIELDS, [quote])])
    frame = dxlink_wire.encode(dxlink_wire.feed_data(1, data))
    yield {"t": _iso(start_ms), "b": "tastytrade", "k": "frame", "d": frame}
    symbols = [dx.streamer_symbol(c.key) for c in contracts]
    for ms, frame in dxlink_frames(symbols, count, start_ms):
        yield {"t": _iso(ms), "b": "tastytrade", "k": "frame", "d": frame}


def _interleave(*streams: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    live = list(streams)
    while live:
        for stream in list(live):
            record = next(stream, None)
            if record is None:
                live.remove(stream)
            else:
                yield record


def _bench(name: str) -> BenchEntry[Any]:
    entry = registry.SPECS[name].bench
    if entry is None:
        raise ValueError(f"broker {name!r} has no benchmark entry")
    return entry


def write_fixture(path: Path, brokers: list[str], per_broker: int) -> Path:
    """Write a plain `.jsonl` fixture (no gzip: the bench times the pipeline, not zlib)
    with `per_broker` snapshots for each broker (its spec's `bench.records`),
    interleaved when there are several."""
    now = datetime.now(UTC)
    contracts = book(now)
    start_ms = int(now.timestamp() * 1000) - 3_600_000
    streams = [_bench(name).records(contracts, per_broker, start_ms) for name in brokers]
    with path.open("wb") as out:
        out.write(orjson.dumps(fixture_header(brokers, now)) + b"\n")
        for record in _interleave(*streams):
            out.write(orjson.dumps(record) + b"\n")
    return path
