"""POST /v1/streaming/start|stop and GET /status with two live sources, the bearer
guard, and the API through the real HTTP server of `open_service`."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import orjson

from greeksd.config import load_settings
from greeksd.service import open_service
from greeksd.sim.market import SyntheticMarket, default_contracts
from greeksd.sim.synthetic import SyntheticSource
from tests.api_harness import open_api
from tests.helpers import fetch_rows, wait_until

TOKEN = "stream-control-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _source(name: str, account: str, seed: int) -> SyntheticSource:
    market = SyntheticMarket(
        default_contracts(date(2026, 11, 25), 4), as_of=date(2026, 11, 25), seed=seed
    )
    return SyntheticSource(market, name=name, account_id=account, ticks_per_second=300)


def _rows_for(db_url: str, account: str) -> int:
    return int(
        fetch_rows(
            db_url, "SELECT count(*) FROM greek_snapshots WHERE account_id = %s", (account,)
        )[0][0]
    )


async def test_stopping_one_broker_leaves_the_other_writing(db_url: str, tmp_path: Path) -> None:
    ibkr, tasty = _source("ibkr", "IB-1", 1), _source("tastytrade", "TT-1", 2)
    async with open_api(db_url, tmp_path, sources=[ibkr, tasty], token=TOKEN) as h:
        await wait_until(
            lambda: _rows_for(db_url, "IB-1") > 20 and _rows_for(db_url, "TT-1") > 20,
            what="both streams writing",
        )
        response = await h.client.post("/v1/streaming/stop", json={"broker": "ibkr"}, headers=AUTH)
        body = orjson.loads(await response.get_data())
        assert response.status_code == 200, body
        assert body["stopped"] == ["ibkr"] and body["unchanged"] == []
        assert body["streams"]["ibkr"]["state"] == "disconnected"
        assert body["streams"]["tastytrade"]["state"] == "connected"
        sent_before_stop = ibkr.ticks_sent

        # Everything ibkr produced lands, then its count stays put while tastytrade grows.
        await wait_until(
            lambda: _rows_for(db_url, "IB-1") == sent_before_stop,
            what="ibkr's accepted rows written",
        )
        tt_after_stop = _rows_for(db_url, "TT-1")
        await wait_until(
            lambda: _rows_for(db_url, "TT-1") > tt_after_stop + 100, what="tastytrade still writing"
        )
        assert ibkr.ticks_sent == sent_before_stop
        assert _rows_for(db_url, "IB-1") == sent_before_stop
        _, status = await h.get_json("/v1/streaming/status")
        assert status["streams"]["ibkr"]["state"] == "disconnected"
        assert status["streams"]["tastytrade"]["state"] == "connected"

        again = await h.client.post("/v1/streaming/stop", json={"broker": "ibkr"}, headers=AUTH)
        assert orjson.loads(await again.get_data())["unchanged"] == ["ibkr"]

        # No body: start every stream; only the stopped one actually starts.
        started = await h.client.post("/v1/streaming/start", headers=AUTH)
        body = orjson.loads(await started.get_data())
        assert (body["started"], body["unchanged"]) == (["ibkr"], ["tastytrade"])
        await wait_until(
            lambda: _rows_for(db_url, "IB-1") > sent_before_stop + 50, what="ibkr writing again"
        )

        stop_all = await h.client.post("/v1/streaming/stop", headers=AUTH)
        assert orjson.loads(await stop_all.get_data())["stopped"] == ["ibkr", "tastytrade"]


async def test_control_routes_refuse_bad_requests(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path, sources=[_source("ibkr", "IB-1", 1)], token=TOKEN) as h:
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({}, 401, "missing_token"),
            ({"headers": {"Authorization": "Bearer nope"}}, 401, "bad_token"),
            ({"headers": AUTH, "json": {"broker": "tastytrade"}}, 400, "unknown_broker"),
            ({"headers": AUTH, "json": {"broker": 7}}, 400, "bad_broker"),
            ({"headers": AUTH, "json": {"brokers": "ibkr"}}, 400, "unknown_field"),
            (
                {"headers": {**AUTH, "Content-Type": "application/json"}, "data": b"{"},
                400,
                "malformed_json",
            ),
            (
                {"headers": {**AUTH, "Content-Type": "text/plain"}, "data": b"ibkr"},
                415,
                "unsupported_media_type",
            ),
        ]
        for path in ("/v1/streaming/stop", "/v1/streaming/start"):
            for kwargs, status, error in cases:
                response = await h.client.post(path, **kwargs)
                text = await response.get_data(as_text=True)
                assert (response.status_code, orjson.loads(text)["error"]) == (status, error)
                assert TOKEN not in text
        assert h.state.supervisor.is_running("ibkr"), "nothing was stopped by a bad request"
        wrong_method = await h.client.get("/v1/streaming/stop")
        assert wrong_method.status_code == 405
        assert orjson.loads(await wrong_method.get_data())["error"] == "method_not_allowed"


SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? (-?[0-9.]+(e[+-]?[0-9]+)?|[+-]Inf|NaN)$'
)


def parse_prometheus(text: str) -> dict[str, float]:
    """Every line is a comment (# HELP / # TYPE) or `name{labels} value`; each sample's
    family was TYPEd before it. Returns {'name{labels}': value}."""
    typed: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP ") or not line:
            continue
        assert SAMPLE.match(line), f"not a Prometheus sample line: {line!r}"
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no # TYPE line"
        samples[series] = float(value)
    return samples


async def test_the_real_http_server(db_url: str, tmp_path: Path) -> None:
    """open_service end to end over a socket: streamed NDJSON, metrics, openapi, auth."""
    settings = load_settings(
        {
            "GREEKSD_DATABASE_URL": db_url,
            "GREEKSD_DATA_DIR": str(tmp_path),
            "GREEKSD_API_PORT": "0",
            "GREEKSD_API_TOKEN": TOKEN,
            "GREEKSD_FLUSH_MS": "20",
        },
        dotenv_path=tmp_path / "none.env",
    )
    source = _source("ibkr", "IB-1", 3)
    async with open_service(settings, [source]) as service:
        base = f"http://{service.api_url.removeprefix('http://')}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            # More than one page, so the first page of 300 has a next cursor.
            await wait_until(
                lambda: service.state.writer.stats.rows_written > 300, what="301 rows written"
            )
            lines = []
            async with client.stream(
                "GET", "/v1/greeks/snapshots", params={"format": "ndjson", "limit": "300"}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "application/x-ndjson"
                assert response.headers["x-next-cursor"]
                async for line in response.aiter_lines():
                    if line:
                        lines.append(orjson.loads(line))
            assert len(lines) == 300 and {r["account_id"] for r in lines} == {"IB-1"}

            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            samples = parse_prometheus(metrics.text)
            assert samples['greeksd_stream_state{broker="ibkr",state="connected"}'] == 1
            assert samples['greeksd_ticks_total{broker="ibkr"}'] > 0
            assert samples["greeksd_write_latency_seconds_count"] > 0

            spec = (await client.get("/openapi.json")).json()
            assert "/v1/risk/timeline" in spec["paths"]

            refused = await client.post("/v1/streaming/stop", json={"broker": "ibkr"})
            assert refused.status_code == 401 and TOKEN not in refused.text
            stopped = await client.post("/v1/streaming/stop", json={"broker": "ibkr"}, headers=AUTH)
            assert stopped.status_code == 200
            assert stopped.json()["streams"]["ibkr"]["state"] == "disconnected"
