"""GET /v1/greeks/snapshots and /latest over a real database: pages, formats, filters,
and the 4xx answers to everything a client can get wrong."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from greeksd.model import Broker
from tests.api_harness import Harness, open_api
from tests.factories import BASE_TIME, make_snapshot
from tests.helpers import fetch_rows

ROWS = 2500
KEY = ("event_time", "broker", "account_id", "contract_key", "fingerprint")


def _rows(n: int = ROWS) -> list[Any]:
    """Many rows share an event_time: 25 per second, across 2 accounts × 5 contracts,
    and the same contract at the same time with different values (distinct rows)."""
    rows = []
    for i in range(n):
        s = make_snapshot(i)
        rows.append(
            replace(
                s,
                account_id="U1" if i % 2 else "U2",
                event_time=BASE_TIME + timedelta(seconds=i // 25),
            )
        )
    return rows


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in KEY)


async def _walk(h: Harness, limit: int, **query: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        q = {"limit": str(limit), **query, **({"cursor": cursor} if cursor else {})}
        status, body = await h.get_json("/v1/greeks/snapshots", **q)
        assert status == 200, body
        assert len(body["rows"]) <= limit
        seen.extend(body["rows"])
        cursor = body["next"]
        if cursor is None:
            return seen
        assert len(body["rows"]) == limit


async def test_pagination_walks_every_row_once_in_key_order(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        await h.put(_rows())
        expected = fetch_rows(
            db_url,
            "SELECT to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS'),"
            " broker, account_id, contract_key, fingerprint FROM greek_snapshots"
            " ORDER BY event_time, broker, account_id, contract_key, fingerprint",
        )
        assert len(expected) == ROWS
        for limit in (1000, 7):
            walked = await _walk(h, limit)
            keys = [_key(r) for r in walked]
            assert len(keys) == ROWS and len(set(keys)) == ROWS, "no repeat, no gap"
            assert [(t[:19], *rest) for t, *rest in keys] == [tuple(r) for r in expected]


async def test_page_header_and_body_carry_the_same_next_cursor(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        await h.put(_rows(30))
        response = await h.client.get("/v1/greeks/snapshots", query_string={"limit": "10"})
        body = orjson.loads(await response.get_data())
        assert response.headers["X-Next-Cursor"] == body["next"]
        last = await h.client.get("/v1/greeks/snapshots", query_string={"limit": "30"})
        assert "X-Next-Cursor" not in last.headers
        assert orjson.loads(await last.get_data())["next"] is None


async def test_ndjson_and_csv_carry_the_same_rows_as_json(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        await h.put(_rows(1200))  # more than one server-side chunk
        _, as_json = await h.get_json("/v1/greeks/snapshots", limit="1100")
        rows = as_json["rows"]

        nd = await h.client.get(
            "/v1/greeks/snapshots", query_string={"limit": "1100", "format": "ndjson"}
        )
        assert nd.headers["Content-Type"] == "application/x-ndjson"
        nd_rows = [orjson.loads(line) for line in (await nd.get_data()).splitlines()]
        assert nd_rows == rows
        assert nd.headers["X-Next-Cursor"] == as_json["next"]

        c = await h.client.get(
            "/v1/greeks/snapshots", query_string={"limit": "1100", "format": "csv"}
        )
        assert c.headers["Content-Type"].startswith("text/csv")
        parsed = list(csv.DictReader(io.StringIO(await c.get_data(as_text=True))))
        assert len(parsed) == len(rows)
        for got, want in zip(parsed, rows, strict=True):
            assert set(got) == set(want)
            for name, value in want.items():
                if value is None:
                    assert got[name] == ""
                elif isinstance(value, float):
                    assert float(got[name]) == value
                elif isinstance(value, int):
                    assert int(got[name]) == value
                else:
                    assert got[name] == value


async def test_filters_select_exactly_the_matching_rows(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        rows = _rows(500)
        await h.put(rows)
        start = BASE_TIME + timedelta(seconds=3)
        end = BASE_TIME + timedelta(seconds=9)
        _, body = await h.get_json(
            "/v1/greeks/snapshots",
            broker="synthetic",
            account="U1",
            # a non-canonical spelling of the same contract finds it
            contract_key="AAPL 2026-12-18 C 185.0",
            underlying="AAPL",
            start=start.isoformat().replace("+00:00", "Z"),
            end=end.replace(tzinfo=None).isoformat(),  # no offset: UTC
        )
        want = [
            s
            for s in rows
            if s.account_id == "U1"
            and s.contract_key == "AAPL 2026-12-18 C 185"
            and start <= s.event_time < end
        ]
        assert want and len(body["rows"]) == len(want)
        assert {r["contract_key"] for r in body["rows"]} == {"AAPL 2026-12-18 C 185"}
        _, none = await h.get_json("/v1/greeks/snapshots", broker="ibkr")
        assert none == {"next": None, "rows": []}


async def test_rows_say_whether_their_market_data_was_live_delayed_or_frozen(
    db_url: str, tmp_path: Path
) -> None:
    flags = ["live", "delayed", "frozen", None]
    async with open_api(db_url, tmp_path) as h:
        await h.put([make_snapshot(i, market_data=flags[i]) for i in range(4)])
        _, body = await h.get_json("/v1/greeks/snapshots")
        assert [r["market_data"] for r in body["rows"]] == flags
        _, latest = await h.get_json("/v1/greeks/latest")
        assert {r["market_data"] for r in latest["rows"]} == set(flags)


async def test_latest_is_the_newest_row_per_contract(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        rows = _rows(300)
        other = replace(
            make_snapshot(0, Broker.IBKR), event_time=BASE_TIME - timedelta(days=1), delta=0.9
        )
        await h.put([*rows, other])
        _, body = await h.get_json("/v1/greeks/latest")
        newest: dict[tuple[str, str, str], Any] = {}
        for s in [*rows, other]:
            k = (s.broker.value, s.account_id, s.contract_key)
            if k not in newest or s.event_time >= newest[k].event_time:
                newest[k] = s
        got = {(r["broker"], r["account_id"], r["contract_key"]): r for r in body["rows"]}
        assert set(got) == set(newest)
        for k, s in newest.items():
            assert got[k]["event_time"].startswith(s.event_time.isoformat()[:19])
        assert got[("ibkr", "U1234567", "AAPL 2026-12-18 C 180")]["delta"] == 0.9
        _, only = await h.get_json("/v1/greeks/latest", broker="ibkr", format="json")
        assert [r["broker"] for r in only["rows"]] == ["ibkr"]
        nd = await h.client.get("/v1/greeks/latest", query_string={"format": "ndjson"})
        assert len((await nd.get_data()).splitlines()) == len(newest)


@pytest.mark.parametrize(
    ("query", "status", "error", "detail_has"),
    [
        ({"start": "yesterday"}, 400, "bad_time", "start='yesterday'"),
        ({"end": "2026-11-25T15:30:00 01:00"}, 400, "bad_time", "%2B"),
        ({"start": "2026-11-25T16:00Z", "end": "2026-11-25T15:00Z"}, 400, "bad_time_range", ""),
        ({"broker": "schwab"}, 400, "unknown_broker", "ibkr"),
        ({"limit": "0"}, 400, "bad_limit", "1 to 50000"),
        ({"limit": "50001"}, 400, "bad_limit", "1 to 50000"),
        ({"limit": "ten"}, 400, "bad_limit", ""),
        ({"cursor": "not-a-cursor"}, 400, "bad_cursor", ""),
        (
            {"cursor": "WyJ0MSIsIjIwMjYtMTEtMjVUMTU6MzA6MDArMDA6MDAiLDFd"},
            400,
            "bad_cursor",
            "another route",
        ),
        ({"format": "xml"}, 400, "bad_format", "ndjson"),
        ({"contract_key": "AAPL"}, 400, "bad_contract_key", "ROOT"),
        ({"acount": "U1"}, 400, "unknown_parameter", "acount"),
        ({"account": ""}, 400, "empty_parameter", "account"),
    ],
)
async def test_bad_queries_get_a_specific_4xx(
    db_url: str,
    tmp_path: Path,
    query: dict[str, str],
    status: int,
    error: str,
    detail_has: str,
) -> None:
    async with open_api(db_url, tmp_path) as h:
        got_status, body = await h.get_json("/v1/greeks/snapshots", **query)
        assert (got_status, body["error"]) == (status, error), body
        assert detail_has in body["detail"]


async def test_database_down_is_a_503_without_a_trace(db_url: str, tmp_path: Path) -> None:
    dead = "postgresql://greeksd@127.0.0.1:9/none?connect_timeout=1"
    async with open_api(db_url, tmp_path, reads_url=dead) as h:
        for path in ("/v1/greeks/snapshots", "/v1/greeks/latest", "/v1/risk/timeline"):
            status, body = await h.get_json(path)
            assert status == 503
            assert body["error"] == "database_unavailable"
            assert "Traceback" not in body["detail"] and "9" not in body["detail"]
