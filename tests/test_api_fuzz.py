"""Property test against /openapi.json: every documented route, fed generated query
strings and bodies (valid-looking and junk), answers with a status below 500 and a JSON
error body when it refuses. The routes and parameter names come from the served OpenAPI
document itself, so a new route is fuzzed without touching this file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api_harness import open_api
from tests.factories import make_snapshot

TOKEN = "fuzz-token-123"

_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "ibkr",
            "tastytrade",
            "AAPL",
            "AAPL 2026-12-18 C 190",
            "json",
            "csv",
            "ndjson",
            "1s",
            "1m",
            "1h",
            "2026-11-25T15:30:00Z",
            "2026-11-25",
            "2026-11-25T15:30:00+05:00",
            "-1",
            "0",
            "50001",
            "1000",
            "NaN",
            "eyJ4Ijox",
        ]
    ),
    st.integers(-(10**12), 10**12).map(str),
)
_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=12,
)
_trade_bodies = st.fixed_dictionaries(
    {},
    optional={
        "broker": st.sampled_from(["ibkr", "tastytrade", "etrade", ""]),
        "account_id": st.text(max_size=12),
        "symbol": st.text(max_size=12),
        "side": st.sampled_from(["buy", "sell", "hold"]),
        "quantity": st.one_of(st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5)),
        "price": st.one_of(st.none(), st.floats(allow_nan=False), st.text(max_size=5)),
        "executed_at": _values,
        "contract_key": _values,
        "broker_trade_id": st.text(max_size=12),
        "note": st.text(max_size=30),
    },
)


async def _routes(api: Any) -> list[tuple[str, str, list[str]]]:
    status, spec = await api.get_json("/openapi.json")
    assert status == 200
    routes = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            names = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"]
            routes.append((path, method.upper(), names))
    assert len(routes) >= 10
    return routes


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_every_documented_route_survives_generated_input(
    db_url: str, tmp_path: Path, data: st.DataObject
) -> None:
    # Hypothesis runs each example in its own trio run, so the service core is opened per
    # example (an async fixture would be torn down under it).
    async with open_api(db_url, tmp_path, token=TOKEN) as api:
        await api.put([make_snapshot(i) for i in range(30)])
        await _probe(api, data)


async def _probe(api: Any, data: st.DataObject) -> None:
    routes = await _routes(api)
    path, method, names = data.draw(st.sampled_from(routes))
    query = data.draw(
        st.dictionaries(
            st.sampled_from([*names, "bogus"]) if names else st.just("bogus"), _values, max_size=4
        )
    )
    headers = {"Authorization": f"Bearer {data.draw(st.sampled_from([TOKEN, 'wrong']))}"}
    if method == "GET":
        response = await api.client.get(path, query_string=query, headers=headers)
    else:
        body = data.draw(_trade_bodies if path.endswith("/trades") else _json)
        raw = orjson.dumps(body) if data.draw(st.booleans()) else data.draw(st.binary(max_size=40))
        response = await api.client.post(
            path,
            data=raw,
            query_string=query,
            headers={**headers, "Content-Type": "application/json"},
        )
    payload = await response.get_data()
    assert response.status_code < 500, (method, path, query, response.status_code, payload)
    if response.status_code >= 400:
        error = orjson.loads(payload)
        assert error["error"] and isinstance(error["detail"], str)
