"""/openapi.json describes every route; /metrics is Prometheus text with every metric."""

from __future__ import annotations

from pathlib import Path

from tests.api_harness import open_api
from tests.helpers import wait_until
from tests.test_api_streaming import _source, parse_prometheus

METRICS = (
    "greeksd_ticks_total",
    "greeksd_rejected_frames_total",
    "greeksd_reconnects_total",
    "greeksd_restarts_total",
    "greeksd_stream_state",
    "greeksd_rows_written_total",
    "greeksd_batches_total",
    "greeksd_duplicates_total",
    "greeksd_late_total",
    "greeksd_conflated_total",
    "greeksd_queue_depth",
    "greeksd_writer_failed_attempts_total",
    "greeksd_write_latency_seconds_bucket",
    "greeksd_write_latency_seconds_sum",
    "greeksd_write_latency_seconds_count",
)


GUARDED = {
    ("/v1/streaming/start", "post"),
    ("/v1/streaming/stop", "post"),
    ("/v1/trades", "post"),
}


def _guarded(spec: dict) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    }


async def test_openapi_lists_every_registered_route(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path, token="meta-token") as h:
        status, spec = await h.get_json("/openapi.json")
        assert status == 200 and spec["openapi"].startswith("3.")
        routes = [r for r in h.app.url_map.iter_rules() if r.endpoint != "static"]
        assert len(routes) >= 11
        for rule in routes:
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
                assert method.lower() in spec["paths"].get(rule.rule, {}), (rule.rule, method)
        assert _guarded(spec) == GUARDED
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path, method in GUARDED:
            assert "401" in spec["paths"][path][method]["responses"]


async def test_openapi_without_a_token_requires_no_authorization(
    db_url: str, tmp_path: Path
) -> None:
    """No token configured: the routes are open, and the document says so (no security
    requirement, no scheme, no 401) — and a POST without Authorization indeed works."""
    async with open_api(db_url, tmp_path) as h:
        status, spec = await h.get_json("/openapi.json")
        assert status == 200
        assert _guarded(spec) == set()
        assert "securitySchemes" not in spec.get("components", {})
        for path, method in GUARDED:
            assert "401" not in spec["paths"][path][method]["responses"]
        response = await h.client.post("/v1/streaming/stop")
        assert response.status_code == 200


async def test_metrics_is_prometheus_text_with_every_metric(db_url: str, tmp_path: Path) -> None:
    sources = [_source("ibkr", "IB-1", 1), _source("tastytrade", "TT-1", 2)]
    async with open_api(db_url, tmp_path, sources=sources) as h:
        await wait_until(lambda: h.state.writer.stats.rows_written > 50, what="rows written")
        response = await h.client.get("/metrics")
        assert response.status_code == 200
        samples = parse_prometheus(await response.get_data(as_text=True))
        names = {s.split("{", 1)[0] for s in samples}
        assert set(METRICS) <= names, set(METRICS) - names
        for broker in ("ibkr", "tastytrade"):
            assert samples[f'greeksd_ticks_total{{broker="{broker}"}}'] > 0
            states = [
                v
                for k, v in samples.items()
                if k.startswith(f'greeksd_stream_state{{broker="{broker}"')
            ]
            assert sorted(states) == [0, 0, 0, 1]
        assert 50 < samples["greeksd_rows_written_total"] <= h.state.writer.stats.rows_written
        assert (
            samples['greeksd_write_latency_seconds_bucket{le="+Inf"}']
            == samples["greeksd_write_latency_seconds_count"]
        )
        buckets = [v for k, v in samples.items() if "_bucket" in k]
        assert buckets == sorted(buckets), "cumulative buckets"


async def test_healthz(db_url: str, tmp_path: Path) -> None:
    async with open_api(db_url, tmp_path) as h:
        status, body = await h.get_json("/healthz")
        assert status == 200 and body["status"] == "ok"
        missing = await h.client.get("/v1/nothing")
        assert missing.status_code == 404
