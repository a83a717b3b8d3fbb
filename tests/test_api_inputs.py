"""What the database would refuse or the API could not render is refused up front (400,
nothing stored); what is stored anyway always renders; a response that breaks after its
headers ends the connection visibly."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio

from tests.api_harness import Harness, open_api, serve_api
from tests.factories import make_snapshot
from tests.helpers import fetch_rows, wait_until
from tests.test_api_trades import AUTH, ENTRY, TOKEN

ROUTES_WITH_TEXT_FILTERS = (
    "/v1/greeks/snapshots",
    "/v1/greeks/latest",
    "/v1/risk/timeline",
    "/v1/trades",
)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("quantity", 2e19, "bad_quantity"),  # stored, then broke every listing
        ("quantity", -2e19, "bad_quantity"),
        ("quantity", 1e15, "bad_quantity"),
        ("quantity", "1e400", "bad_quantity"),
        ("quantity", "1e-25", "bad_quantity"),
        ("price", 2e19, "bad_price"),
        ("price", 1e300, "bad_price"),
        ("account_id", "U1\x00", "bad_account_id"),
        ("symbol", "\x00", "bad_symbol"),
        ("note", "a\x00b", "bad_note"),
        ("broker_trade_id", "id\x00", "bad_broker_trade_id"),
        ("contract_key", "AAPL 2026-12-18 C 190\x00", "bad_contract_key"),
        ("executed_at", "2026-11-25T15:30:00\x00Z", "bad_executed_at"),
        ("executed_at", "0001-01-01T00:00:00+14:00", "bad_time"),
        ("executed_at", "9999-12-31T23:00:00-05:00", "bad_time"),
    ],
)
async def test_post_refuses_what_the_database_or_the_renderer_cannot_take(
    db_url: str, tmp_path: Path, field: str, value: Any, error: str
) -> None:
    async with open_api(db_url, tmp_path, token=TOKEN) as h:
        response = await h.client.post("/v1/trades", json={**ENTRY, field: value}, headers=AUTH)
        body = orjson.loads(await response.get_data())
        assert (response.status_code, body["error"]) == (400, error), body
        assert field in body["detail"] or "time" in body["detail"]
        assert fetch_rows(db_url, "SELECT count(*) FROM trades") == [(0,)]


@pytest.mark.parametrize("executed_at", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"])
async def test_times_at_the_edge_of_the_range_are_stored_and_listed(
    db_url: str, tmp_path: Path, executed_at: str
) -> None:
    async with open_api(db_url, tmp_path, token=TOKEN) as h:
        response = await h.client.post(
            "/v1/trades", json={**ENTRY, "executed_at": executed_at}, headers=AUTH
        )
        assert response.status_code == 201, await response.get_data()
        status, listing = await h.get_json("/v1/trades")
        assert status == 200 and len(listing["rows"]) == 1


@pytest.mark.parametrize("route", ROUTES_WITH_TEXT_FILTERS)
@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("account", "U1\x00", "bad_account"),
        ("broker", "ibkr\x00", "bad_broker"),
        ("start", "2026-11-25T15:30:00\x00", "bad_start"),
        ("start", "0001-01-01T00:00:00+14:00", "bad_time"),
        ("end", "9999-12-31T23:00:00-05:00", "bad_time"),
        ("account", "", "empty_parameter"),
        ("broker", "", "empty_parameter"),
    ],
)
async def test_query_filters_are_refused_before_the_database(
    db_url: str, tmp_path: Path, route: str, name: str, value: str, error: str
) -> None:
    async with open_api(db_url, tmp_path) as h:
        status, body = await h.get_json(route, **{name: value})
        assert (status, body["error"]) == (400, error), body


async def test_other_text_parameters_refuse_nul(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        for route, name in (
            ("/v1/greeks/snapshots", "underlying"),
            ("/v1/greeks/snapshots", "contract_key"),
            ("/v1/greeks/snapshots", "cursor"),
            ("/v1/greeks/snapshots", "format"),
            ("/v1/greeks/snapshots", "limit"),
            ("/v1/risk/timeline", "bucket"),
        ):
            status, body = await h.get_json(route, **{name: "x\x00"})
            assert status == 400, (route, name, body)
        status, body = await h.get_json("/v1/greeks/snapshots", limit="²")  # isdigit, not int
        assert (status, body["error"]) == (400, "bad_limit")


async def test_risk_without_start_near_year_one_is_a_400(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        status, body = await h.get_json("/v1/risk/timeline", end="0001-01-01T00:30:00Z")
        assert (status, body["error"]) == (400, "bad_time_range"), body


# Rows other paths could have stored (a broker's execution, a manual INSERT): a numeric
# beyond a JSON integer, non-finite numerics, times Python cannot hold.
ODD_TRADES = [
    ("odd-1", "20000000000000000000", "'Infinity'", "2026-11-25 15:30:00+00"),
    ("odd-2", "1e30", "'NaN'", "10000-01-01 00:00:00+00"),
    ("odd-3", "-2", "1e-400", "0001-12-31 10:00:00+00 BC"),
    ("plain", "2", "5.3", "2026-11-25 15:31:00+00"),
]


def _store_odd_rows(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for trade_id, quantity, price, executed_at in ODD_TRADES:
            conn.execute(
                "INSERT INTO trades (broker, broker_trade_id, account_id, symbol, side,"
                f" quantity, price, executed_at) VALUES ('ibkr', %s, 'U1', 'AAPL', 'buy',"
                f" {quantity}, {price}::numeric, %s)",
                (trade_id, executed_at),
            )
        conn.execute(
            "INSERT INTO greek_snapshots (broker, account_id, contract_key, underlying,"
            " expiration, strike, option_type, quantity, multiplier, delta, event_time,"
            " received_at, persisted_at, fingerprint) VALUES ('ibkr', 'U1',"
            " 'AAPL 2026-12-18 C 190', 'AAPL', 'infinity', 1e30, 'C', 'NaN', 100, 0.5,"
            " '10000-01-01 00:00:00+00', now(), now(), 1)"
        )


async def _walk(h: Harness, route: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10):
        query = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        status, page = await h.get_json(route, **query)
        assert status == 200, page
        rows += page["rows"]
        cursor = page["next"]
        if cursor is None:
            return rows
    raise AssertionError("the cursor walk did not end")


async def test_rows_the_api_could_not_render_still_list_in_every_format(
    db_url: str, tmp_path: Path
) -> None:
    _store_odd_rows(db_url)
    async with open_api(db_url, tmp_path) as h:
        status, page = await h.get_json("/v1/trades")
        assert status == 200
        by_id = {r["broker_trade_id"]: r for r in page["rows"]}
        assert set(by_id) == {t[0] for t in ODD_TRADES}
        assert by_id["odd-1"]["quantity"] == 20000000000000000000
        assert by_id["odd-1"]["price"] == "Infinity"
        assert by_id["odd-2"]["quantity"] == 1e30
        assert by_id["odd-2"]["executed_at"] == "10000-01-01 00:00:00+00"
        assert by_id["odd-3"]["executed_at"] == "0001-12-31 10:00:00+00 BC"
        assert by_id["odd-3"]["price"].startswith("1E-400")

        response = await h.client.get("/v1/trades", query_string={"format": "ndjson"})
        lines = (await response.get_data()).splitlines()
        assert response.status_code == 200 and len(lines) == len(ODD_TRADES)
        assert all(orjson.loads(line) for line in lines)
        response = await h.client.get("/v1/trades", query_string={"format": "csv"})
        table = list(csv.reader(io.StringIO(await response.get_data(as_text=True))))
        assert response.status_code == 200 and len(table) == 1 + len(ODD_TRADES)

        walked = await _walk(h, "/v1/trades")
        assert [r["broker_trade_id"] for r in walked] == [
            r["broker_trade_id"] for r in page["rows"]
        ]

        for route in ("/v1/greeks/snapshots", "/v1/greeks/latest"):
            status, snapshots = await h.get_json(route)
            assert status == 200 and len(snapshots["rows"]) == 1, snapshots
            row = snapshots["rows"][0]
            assert row["event_time"] == "10000-01-01 00:00:00+00"
            assert row["expiration"] == "infinity" and row["strike"] == 1e30
            assert row["quantity"] == "NaN"


async def test_a_response_broken_after_its_headers_ends_without_a_clean_terminator(
    db_url: str, tmp_path: Path
) -> None:
    """The database connection dies mid-page: the client must see a broken chunked
    body and a closed connection, never a complete-looking 200."""
    rows = 20_000  # far more than the socket buffers hold, so the page is mid-way
    async with serve_api(db_url, tmp_path) as service:
        for i in range(rows):
            service.state.sink.put(make_snapshot(i))
        await service.state.writer.wait_settled(rows)
        host, port = service.api_url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"GET /v1/greeks/snapshots?limit={rows} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        )
        received = await stream.receive_some(65536)
        assert received.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in (
            received.lower()
        )

        def kill_page_reader() -> bool:
            killed = fetch_rows(
                db_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND query LIKE '%%greeksd_page%%'",
            )
            return any(ok for (ok,) in killed)

        await wait_until(kill_page_reader, what="the page's connection terminated")
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                received += chunk
        await stream.aclose()
    body = received.split(b"\r\n\r\n", 1)[1]
    assert not body.endswith(b"0\r\n\r\n"), "a cut body must not end like a complete one"
    assert len(body) < rows * 300, "the page must really have been cut"
