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
- `missing` is how many of the carried contracts had no fresh Greeks at the bucket's
  end (the range's end, if sooner): their carried snapshot has no delta, or their
  Greeks last arrived more than `stale_s` before that instant (never, with `stale_s`
  0). Snapshots are merged rows (an IBKR price tick repeats the last Greeks), so Greeks
  "arrive" with a snapshot whose delta is known and whose Greeks differ from the
  contract's previous snapshot in the range, or with its first snapshot with a delta
  (see `risk_rows_query`).
- A group appears from its first bucket with data and has one point per bucket after it.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    end: datetime  # of the range: the last bucket may reach past it (into the future)

    @classmethod
    def covering(cls, start: datetime, end: datetime, width_s: int) -> Grid:
        offset = (start - EPOCH) // timedelta(seconds=width_s)
        first = EPOCH + offset * timedelta(seconds=width_s)
        count = math.ceil((end - first) / timedelta(seconds=width_s))
        return cls(first, timedelta(seconds=width_s), max(count, 0), end)

    def judged_at(self, t: datetime) -> datetime:
        """When the bucket starting at `t` is judged: its end, or the range's if sooner
        (the current bucket is not judged at an instant still to come)."""
        return min(t + self.width, self.end)


# A contract's `fresh_until` when it has no Greeks at all, and when they never go stale.
NEVER_FRESH = datetime.min.replace(tzinfo=UTC)
ALWAYS_FRESH = datetime.max.replace(tzinfo=UTC)


def fresh_until(greeks_at: datetime | None, stale: timedelta | None) -> datetime:
    """The instant after which a contract whose Greeks arrived at `greeks_at` counts as
    missing them (`stale` None: staleness disabled)."""
    if greeks_at is None:
        return NEVER_FRESH
    if stale is None or greeks_at >= ALWAYS_FRESH - stale:
        return ALWAYS_FRESH
    return greeks_at + stale


@dataclass
class Book:
    """One group's carried contracts: weighted Greeks, and when each stops being fresh,
    also kept sorted so that a bucket's `missing` is one bisection."""

    weighted: dict[str, tuple[float | None, ...]] = field(default_factory=dict)
    until: dict[str, datetime] = field(default_factory=dict)
    sorted_until: list[datetime] = field(default_factory=list)

    def carry(self, contract: str, weighted: tuple[float | None, ...], until: datetime) -> None:
        previous = self.until.get(contract)
        if previous is not None:
            del self.sorted_until[bisect_left(self.sorted_until, previous)]
        insort(self.sorted_until, until)
        self.until[contract] = until
        self.weighted[contract] = weighted

    def sums(self) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for i, greek in enumerate(GREEKS):
            known = [v for w in self.weighted.values() if (v := w[i]) is not None]
            point[greek] = math.fsum(known) if known else None
        point["contracts"] = len(self.weighted)
        return point

    def missing(self, at: datetime) -> int:
        """Contracts without fresh Greeks at `at`: fresh until strictly before it."""
        return bisect_left(self.sorted_until, at)


def carry_forward(
    rows: Iterable[tuple[Any, ...]], grid: Grid, stale_s: float
) -> list[dict[str, Any]]:
    """Sweep rows (bucket, broker, account, underlying, contract, w_delta, w_gamma,
    w_theta, w_vega, greeks_at), ordered by bucket, into one series per group."""
    stale = timedelta(seconds=stale_s) if stale_s > 0 else None
    books: dict[Group, Book] = {}
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
            book = books.setdefault(group, Book())
            book.carry(pending[4], tuple(pending[5:9]), fresh_until(pending[9], stale))
            changed.add(group)
            pending = next(it, None)
        for group in changed:
            current[group] = books[group].sums()
        judged = grid.judged_at(t)
        for group, point in current.items():
            missing = books[group].missing(judged)
            points.setdefault(group, []).append({"t": t, **point, "missing": missing})
    return [
        {"broker": g[0], "account_id": g[1], "underlying": g[2], "points": points[g]}
        for g in sorted(points)
    ]


def risk_timeline(
    conn: psycopg.Connection, f: Filter, width_s: int, stale_s: float
) -> list[dict[str, Any]]:
    """Blocking: run in a worker thread. `f.start` and `f.end` must be set; `stale_s` 0
    disables staleness."""
    assert f.start is not None and f.end is not None
    grid = Grid.covering(f.start, f.end, width_s)
    with conn.cursor(name="greeksd_risk") as cur:
        cur.execute(*risk_rows_query(f, width_s))
        return carry_forward(cur, grid, stale_s)
