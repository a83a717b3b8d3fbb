"""Trades: the store function the broker writers use, and GET/POST /v1/trades."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from greeksd.model import Broker, Trade
from greeksd.store.trades import insert_trades
from tests.api_harness import open_api
from tests.helpers import fetch_rows

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENTRY: dict[str, Any] = {
    "broker": "ibkr",
    "account_id": "U1",
    "symbol": "AAPL",
    "side": "buy",
    "quantity": 2,
    "price": 5.3,
    "executed_at": "2026-11-25T15:30:00Z",
    "contract_key": "AAPL 2026-12-18 C 190.0",
}


def _trade(i: int, broker: Broker = Broker.IBKR) -> Trade:
    return Trade(
        broker=broker,
        broker_trade_id=f"X{i}",
        account_id="U1",
        contract_key="AAPL 2026-12-18 C 190",
        symbol="AAPL",
        side="buy" if i % 2 else "sell",
        quantity=Decimal(i + 1),
        price=Decimal("1.25"),
        executed_at=datetime(2026, 11, 25, 15, tzinfo=UTC) + timedelta(seconds=i // 3),
        source_payload={"i": i},
    )


def test_insert_trades_is_idempotent_on_broker_and_trade_id(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        assert insert_trades(conn, [_trade(i) for i in range(5)]) == 5
        assert insert_trades(conn, [_trade(i) for i in range(3, 8)]) == 3
        assert insert_trades(conn, [_trade(0, Broker.TASTYTRADE)]) == 1, "other broker"
        assert insert_trades(conn, []) == 0
    assert fetch_rows(db_url, "SELECT count(*) FROM trades") == [(9,)]


async def test_post_stores_once_and_answers_201_then_200(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path, token=TOKEN) as h:
        first = await h.client.post("/v1/trades", json=ENTRY, headers=AUTH)
        assert first.status_code == 201
        row = orjson.loads(await first.get_data())
        assert row["source"] == "strategy" and row["contract_key"] == "AAPL 2026-12-18 C 190"
        assert row["broker_trade_id"].startswith("strategy-")
        again = await h.client.post("/v1/trades", json=ENTRY, headers=AUTH)
        assert again.status_code == 200
        assert orjson.loads(await again.get_data()) == row

        named = {**ENTRY, "broker_trade_id": "mine-1", "note": "hedge"}
        assert (await h.client.post("/v1/trades", json=named, headers=AUTH)).status_code == 201
        assert (await h.client.post("/v1/trades", json=named, headers=AUTH)).status_code == 200
        clash = await h.client.post("/v1/trades", json={**named, "quantity": 3}, headers=AUTH)
        assert clash.status_code == 409
        assert orjson.loads(await clash.get_data())["error"] == "trade_id_conflict"
    assert fetch_rows(db_url, "SELECT count(*) FROM trades") == [(2,)]


async def test_get_trades_pages_and_filters(db_url: str, tmp_path: Path) -> None:
    with psycopg.connect(db_url) as conn:
        insert_trades(conn, [_trade(i) for i in range(20)])
        insert_trades(conn, [_trade(i, Broker.TASTYTRADE) for i in range(5)])
    async with open_api(db_url, tmp_path) as h:
        ids: list[int] = []
        cursor = None
        while True:
            query = {"limit": "3", "broker": "ibkr", **({"cursor": cursor} if cursor else {})}
            status, body = await h.get_json("/v1/trades", **query)
            assert status == 200, body
            ids += [r["id"] for r in body["rows"]]
            if not (cursor := body["next"]):
                break
        assert len(ids) == 20 and len(set(ids)) == 20
        _, window = await h.get_json(
            "/v1/trades", start="2026-11-25T15:00:01Z", end="2026-11-25T15:00:02Z"
        )
        assert len(window["rows"]) == 3 + 2, "ibkr i=3..5, tastytrade i=3..4"
        status, bad = await h.get_json("/v1/trades", underlying="AAPL")
        assert (status, bad["error"]) == (400, "unknown_parameter")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"broker": "schwab"}, "unknown_broker"),
        ({"broker": "synthetic"}, "unknown_broker"),
        ({"side": "short"}, "bad_side"),
        ({"quantity": 0}, "bad_quantity"),
        ({"quantity": "lots"}, "bad_quantity"),
        ({"quantity": True}, "bad_quantity"),
        ({"price": -1}, "bad_price"),
        ({"executed_at": "2026-11-25T15:30:00"}, "bad_time"),
        ({"executed_at": "soon"}, "bad_time"),
        ({"contract_key": "AAPL C 190"}, "bad_contract_key"),
        ({"account_id": None}, "missing_field"),
        ({"account_id": ""}, "bad_account_id"),
        ({"colour": "red"}, "unknown_field"),
    ],
)
async def test_post_validation(
    db_url: str, tmp_path: Path, change: dict[str, Any], error: str
) -> None:
    entry = {k: v for k, v in {**ENTRY, **change}.items() if v is not None}
    async with open_api(db_url, tmp_path) as h:
        response = await h.client.post("/v1/trades", json=entry)
        body = orjson.loads(await response.get_data())
        assert (response.status_code, body["error"]) == (400, error), body
        assert body["detail"]
    assert fetch_rows(db_url, "SELECT count(*) FROM trades") == [(0,)]


async def test_post_body_shape_errors(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        cases = [
            (
                {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
                400,
                "malformed_json",
            ),
            (
                {"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}},
                400,
                "malformed_json",
            ),
            (
                {"data": orjson.dumps(ENTRY), "headers": {"Content-Type": "text/plain"}},
                415,
                "unsupported_media_type",
            ),
            ({"data": b"", "headers": {"Content-Type": "application/json"}}, 400, "malformed_json"),
            (
                {"data": b"x" * 70_000, "headers": {"Content-Type": "application/json"}},
                413,
                "request_entity_too_large",
            ),
        ]
        for kwargs, status, error in cases:
            response = await h.client.post("/v1/trades", **kwargs)
            body = orjson.loads(await response.get_data())
            assert (response.status_code, body["error"]) == (status, error), body


async def test_post_requires_the_token_when_one_is_set(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path, token=TOKEN) as h:
        for headers, error in (
            ({}, "missing_token"),
            ({"Authorization": "Bearer wrong"}, "bad_token"),
            ({"Authorization": f"Basic {TOKEN}"}, "bad_token"),
        ):
            response = await h.client.post("/v1/trades", json=ENTRY, headers=headers)
            text = await response.get_data(as_text=True)
            assert response.status_code == 401
            assert orjson.loads(text)["error"] == error
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in text
    assert fetch_rows(db_url, "SELECT count(*) FROM trades") == [(0,)]
