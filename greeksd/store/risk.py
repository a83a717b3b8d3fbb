"""The risk timeline: position-weighted Greeks per (broker, account, underlying), bucketed.

Definition (also in the README):
- Buckets are [t, t + width) with t a multiple of the width since the Unix epoch; the
  first bucket is the one holding `start`, the last the one holding the instant before
  `end`. Only snapshots with start <= event_time < end count.
- A contract's weighted Greek is quantity × multiplier × Greek from its snapshot.
- The value of a bucket is, per Greek, the sum over the group's contracts of each
  contract's last weighted value with event_time before the bucket's end: a contract's
  last value in an earlier bucket is carried forward into later buckets until it
  updates. A contract counts from its first snapshot in the range onwards; nothing from
  before `start` is carried in.
- A NULL Greek (or quantity, or multiplier) in a contract's carried snapshot leaves that
  contract out of that Greek's sum; a sum with no known values is null. `contracts` is
  how many contracts are carried in the bucket.
- A group appears from its first bucket with data and has one point per bucket after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from greeksd.store.queries import Filter, risk_rows_query

GREEKS: tuple[str, ...] = ("delta", "gamma", "theta", "vega")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Group = tuple[str, str, str]


@dataclass(frozen=True)
class Grid:
    first: datetime
    width: timedelta
    count: int

    @classmethod
    def covering(cls, start: datetime, end: datetime, width_s: int) -> Grid:
        offset = (start - EPOCH) // timedelta(seconds=width_s)
        first = EPOCH + offset * timedelta(seconds=width_s)
        count = math.ceil((end - first) / timedelta(seconds=width_s))
        return cls(first, timedelta(seconds=width_s), max(count, 0))


def _sum(contracts: dict[str, tuple[float | None, ...]]) -> dict[str, Any]:
    point: dict[str, Any] = {}
    for i, greek in enumerate(GREEKS):
        known = [v for w in contracts.values() if (v := w[i]) is not None]
        point[greek] = math.fsum(known) if known else None
    point["contracts"] = len(contracts)
    return point


def carry_forward(rows: Iterable[tuple[Any, ...]], grid: Grid) -> list[dict[str, Any]]:
    """Sweep rows (bucket, broker, account, underlying, contract, w_delta, w_gamma,
    w_theta, w_vega), ordered by bucket, into one series per group."""
    carried: dict[Group, dict[str, tuple[float | None, ...]]] = {}
    current: dict[Group, dict[str, Any]] = {}
    points: dict[Group, list[dict[str, Any]]] = {}
    it: Iterator[tuple[Any, ...]] = iter(rows)
    pending = next(it, None)
    for i in range(grid.count):
        t = grid.first + i * grid.width
        changed: set[Group] = set()
        while pending is not None and pending[0] <= t:
            assert pending[0] == t, "rows must be ordered by bucket and inside the grid"
            group: Group = (pending[1], pending[2], pending[3])
            carried.setdefault(group, {})[pending[4]] = tuple(pending[5:9])
            changed.add(group)
            pending = next(it, None)
        for group in changed:
            current[group] = _sum(carried[group])
        for group, point in current.items():
            points.setdefault(group, []).append({"t": t, **point})
    return [
        {"broker": g[0], "account_id": g[1], "underlying": g[2], "points": points[g]}
        for g in sorted(points)
    ]


def risk_timeline(conn: psycopg.Connection, f: Filter, width_s: int) -> list[dict[str, Any]]:
    """Blocking: run in a worker thread. `f.start` and `f.end` must be set."""
    assert f.start is not None and f.end is not None
    grid = Grid.covering(f.start, f.end, width_s)
    with conn.cursor(name="greeksd_risk") as cur:
        cur.execute(*risk_rows_query(f, width_s))
        return carry_forward(cur, grid)
