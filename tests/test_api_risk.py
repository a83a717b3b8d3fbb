"""GET /v1/risk/timeline against a hand-computed expectation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from greeksd.model import Broker, Contract, OptionRight, Snapshot
from greeksd.store.risk import Grid
from tests.api_harness import open_api
from tests.factories import make_contract

T0 = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)

# 2 accounts, 2 underlyings, 3 contract keys. Weight = quantity × multiplier (100).
A_K1 = make_contract("AAPL", "190", OptionRight.CALL, account="A", quantity="2")  # 200
A_K2 = make_contract("AAPL", "180", OptionRight.PUT, account="A", quantity="-1")  # -100
A_K3 = make_contract("MSFT", "400", OptionRight.PUT, account="A", quantity="1")  # 100
B_K1 = make_contract("AAPL", "190", OptionRight.CALL, account="B", quantity="3")  # 300


def _snap(contract: Contract, at: str, d: float, g: float, t: float, v: float | None) -> Snapshot:
    m, s = (int(x) for x in at.split(":"))
    when = T0 + timedelta(minutes=m - 30, seconds=s)
    return Snapshot.for_contract(
        Broker.IBKR,
        contract,
        event_time=when,
        received_at=when,
        delta=d,
        gamma=g,
        theta=t,
        vega=v,
    )


ROWS = [
    _snap(A_K1, "30:10", 0.5, 0.02, -0.1, 0.2),
    _snap(A_K1, "30:50", 0.6, 0.03, -0.1, 0.2),  # last in bucket 15:30 wins
    _snap(A_K1, "32:30", 0.7, 0.04, -0.12, 0.25),
    _snap(A_K2, "31:20", -0.4, 0.01, -0.05, 0.3),
    _snap(A_K3, "29:59", -0.2, 0.01, -0.04, 0.1),  # before start: not carried in
    _snap(A_K3, "31:05", -0.3, 0.01, -0.04, 0.1),
    _snap(A_K3, "33:10", -0.35, 0.012, -0.04, None),  # missing vega
    _snap(B_K1, "30:30", 0.55, 0.025, -0.11, 0.21),
    _snap(B_K1, "34:00", 0.9, 0.05, -0.2, 0.3),  # == end: excluded
]

# (delta, gamma, theta, vega, contracts, missing) per bucket, carried forward; missing with
# the default GREEKSD_STALE_S of 120 s: A_K2's Greeks (15:31:20) are 160 s old at 15:34,
# B_K1's (15:30:30) 150 s old at 15:33.
A_AAPL = [
    (120, 6, -20, 40, 1, 0),
    (160, 5, -15, 10, 2, 0),
    (180, 7, -19, 20, 2, 0),
    (180, 7, -19, 20, 2, 1),
]
A_MSFT = [(-30, 1, -4, 10, 1, 0), (-30, 1, -4, 10, 1, 0), (-35, 1.2, -4, None, 1, 0)]
B_AAPL = [(165, 7.5, -33, 63, 1, 0)] * 2 + [(165, 7.5, -33, 63, 1, 1)] * 2


async def test_timeline_matches_hand_computed_buckets(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        await h.put(ROWS)
        status, body = await h.get_json(
            "/v1/risk/timeline",
            start="2026-11-25T15:30:00Z",
            end="2026-11-25T15:34:00Z",
            bucket="1m",
        )
        assert status == 200, body
        series = {
            (s["broker"], s["account_id"], s["underlying"]): s["points"] for s in body["series"]
        }
        assert set(series) == {("ibkr", "A", "AAPL"), ("ibkr", "A", "MSFT"), ("ibkr", "B", "AAPL")}
        for group, expected in (
            (("ibkr", "A", "AAPL"), A_AAPL),
            (("ibkr", "A", "MSFT"), A_MSFT),
            (("ibkr", "B", "AAPL"), B_AAPL),
        ):
            points = series[group]
            first = 4 - len(expected)
            assert [p["t"] for p in points] == [
                (T0 + timedelta(minutes=first + i)).isoformat() for i in range(len(expected))
            ]
            for point, (d, g, t, v, n, m) in zip(points, expected, strict=True):
                assert point["delta"] == pytest.approx(d)
                assert point["gamma"] == pytest.approx(g)
                assert point["theta"] == pytest.approx(t)
                assert point["vega"] == (None if v is None else pytest.approx(v))
                assert (point["contracts"], point["missing"]) == (n, m)
        assert body["stale_s"] == 120.0

        _, only_b = await h.get_json(
            "/v1/risk/timeline",
            account="B",
            start="2026-11-25T15:30:00Z",
            end="2026-11-25T15:34:00Z",
        )
        assert [s["account_id"] for s in only_b["series"]] == ["B"]


async def test_default_window_is_the_last_hour(db_url: str, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    recent = Snapshot.for_contract(
        Broker.IBKR, B_K1, event_time=now - timedelta(minutes=30), received_at=now, delta=0.5
    )
    old = Snapshot.for_contract(
        Broker.IBKR, A_K1, event_time=now - timedelta(hours=2), received_at=now, delta=0.5
    )
    async with open_api(db_url, tmp_path) as h:
        await h.put([recent, old])
        status, body = await h.get_json("/v1/risk/timeline")
        assert status == 200
        assert [s["account_id"] for s in body["series"]] == ["B"]
        assert body["series"][0]["points"][-1]["delta"] == pytest.approx(150)
        assert body["series"][0]["points"][-1]["gamma"] is None


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"bucket": "2m"}, "bad_bucket"),
        (
            {"bucket": "1s", "start": "2026-11-25T12:00Z", "end": "2026-11-25T15:00Z"},
            "too_many_buckets",
        ),
        ({"contract_key": "AAPL 2026-12-18 C 190"}, "unknown_parameter"),
        ({"start": "2026-13-01"}, "bad_time"),
        ({"broker": "nope"}, "unknown_broker"),
    ],
)
async def test_bad_timeline_queries(
    db_url: str, tmp_path: Path, query: dict[str, str], error: str
) -> None:
    async with open_api(db_url, tmp_path) as h:
        status, body = await h.get_json("/v1/risk/timeline", **query)
        assert (status, body["error"]) == (400, error), body
        assert body["detail"]


def test_grid_covers_start_to_end_with_epoch_aligned_buckets() -> None:
    grid = Grid.covering(T0 + timedelta(seconds=10), T0 + timedelta(minutes=2), 60)
    assert (grid.first, grid.count) == (T0, 2)
    assert Grid.covering(T0, T0 + timedelta(seconds=61), 60).count == 2
    assert Grid.covering(T0, T0 + timedelta(hours=3), 1).count == 10_800


# Greeks that stop while prices continue, in merged rows as IBKR writes them (a price tick
# repeats the last Greeks), one group (ibkr, C, SPY), 1 m buckets 15:30-15:38.
STOPS = make_contract("SPY", "500", OptionRight.CALL, account="C")
STEADY = make_contract("SPY", "510", OptionRight.CALL, account="C")
NO_GREEKS = make_contract("SPY", "520", OptionRight.PUT, account="C")


def _at(minute: int, second: int) -> datetime:
    return T0 + timedelta(minutes=minute - 30, seconds=second)


def _row(contract: Contract, when: datetime, delta: float | None, bid: float) -> Snapshot:
    greeks = None if delta is None else (0.01, -0.05, 0.2)
    gamma, theta, vega = greeks or (None, None, None)
    return Snapshot.for_contract(
        Broker.IBKR,
        contract,
        event_time=when,
        received_at=when,
        delta=delta,
        gamma=gamma,
        theta=theta,
        vega=vega,
        bid=bid,
        ask=bid + 0.1,
    )


def _stopping_rows() -> list[Snapshot]:
    rows = []
    # STOPS: Greeks every 20 s until 15:31:00, then prices only (delta stays 0.53), Greeks
    # once more at 15:34:30, then prices only again until 15:37:40.
    for i in range(24):  # 15:30:00 ... 15:37:40
        when = _at(30, 20 * i)
        delta = 0.50 + 0.01 * i if i <= 3 else (0.53 if when < _at(34, 30) else 0.60)
        rows.append(_row(STOPS, when, delta, 5.0 + 0.01 * i))
    rows.append(_row(STOPS, _at(34, 30), 0.60, 6.0))
    # STEADY: new Greeks every 30 s, but its 15:35:50 row has none (the broker cleared them).
    for i in range(16):  # 15:30:05 ... 15:37:35
        when = _at(30, 5 + 30 * i)
        rows.append(_row(STEADY, when, 0.40 + 0.001 * i, 3.0 + 0.01 * i))
    rows.append(_row(STEADY, _at(35, 50), None, 3.5))
    # NO_GREEKS: prices from 15:32:10 on, never a delta.
    rows.extend(_row(NO_GREEKS, _at(32 + i, 10), None, 1.0 + 0.01 * i) for i in range(6))
    return rows


@pytest.mark.parametrize(
    ("stale_s", "missing"),
    [
        # bucket ends 15:31 ... 15:38. STOPS: Greeks 60 s old at 15:32 (not more than 60),
        # 120 s at 15:33, fresh again at 15:35 (15:34:30), 90 s old at 15:36. STEADY: its
        # carried row at 15:36 has no delta. NO_GREEKS: from its first row on.
        ("60", [0, 0, 2, 2, 1, 3, 2, 2]),
        # staleness off: only carried rows without a delta
        ("0", [0, 0, 1, 1, 1, 2, 1, 1]),
    ],
)
async def test_missing_counts_contracts_whose_greeks_stopped_while_prices_continued(
    db_url: str, tmp_path: Path, stale_s: str, missing: list[int]
) -> None:
    async with open_api(db_url, tmp_path, settings_env={"GREEKSD_STALE_S": stale_s}) as h:
        await h.put(_stopping_rows())
        status, body = await h.get_json(
            "/v1/risk/timeline", start="2026-11-25T15:30:00Z", end="2026-11-25T15:38:00Z"
        )
        assert status == 200, body
        assert body["stale_s"] == float(stale_s)
        (series,) = body["series"]
        assert (series["account_id"], series["underlying"]) == ("C", "SPY")
        points = series["points"]
        assert [p["t"] for p in points] == [_at(30 + i, 0).isoformat() for i in range(8)]
        assert [p["contracts"] for p in points] == [2, 2, 3, 3, 3, 3, 3, 3]
        assert [p["missing"] for p in points] == missing
        # STOPS's stale delta is still summed (weight 2 × 100): `missing` says it is stale
        assert points[3]["delta"] == pytest.approx(200 * 0.53 + 200 * (0.40 + 0.001 * 7))


async def test_the_current_bucket_is_judged_at_the_end_of_the_range(
    db_url: str, tmp_path: Path
) -> None:
    """A bucket still running is judged at the range's end (now), not at its own end."""
    async with open_api(db_url, tmp_path, settings_env={"GREEKSD_STALE_S": "30"}) as h:
        await h.put([_row(STOPS, _at(30, 0), 0.5, 5.0)])
        for end, missing in (("15:30:25", 0), ("15:30:30", 0), ("15:30:31", 1)):
            _, body = await h.get_json(
                "/v1/risk/timeline", start="2026-11-25T15:30:00Z", end=f"2026-11-25T{end}Z"
            )
            assert [p["missing"] for p in body["series"][0]["points"]] == [missing], end
