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

# (delta, gamma, theta, vega, contracts) per bucket, carried forward.
A_AAPL = [(120, 6, -20, 40, 1), (160, 5, -15, 10, 2), (180, 7, -19, 20, 2), (180, 7, -19, 20, 2)]
A_MSFT = [(-30, 1, -4, 10, 1), (-30, 1, -4, 10, 1), (-35, 1.2, -4, None, 1)]
B_AAPL = [(165, 7.5, -33, 63, 1)] * 4


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
            for point, (d, g, t, v, n) in zip(points, expected, strict=True):
                assert point["delta"] == pytest.approx(d)
                assert point["gamma"] == pytest.approx(g)
                assert point["theta"] == pytest.approx(t)
                assert point["vega"] == (None if v is None else pytest.approx(v))
                assert point["contracts"] == n

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
