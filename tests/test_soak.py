"""Soak: the seed's normal load (200 contracts, 50 ticks/s per broker, both brokers)
for a minute in `just test`, ten minutes in `just soak`. Every accepted tick must be
persisted; the p95 write latency is reported (artifacts/soak-<seconds>s.json)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.pipeline import open_pipeline
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from greeksd.supervisor import Supervisor
from tests.helpers import fetch_rows, wait_until

CONTRACTS = 200
TICKS_PER_S = 50
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


async def _soak(db_url: str, seconds: float) -> dict[str, object]:
    book = default_contracts(datetime.now(UTC).date(), CONTRACTS)
    interval = 1.0 / TICKS_PER_S
    async with (
        open_ibkr_sim(book, tick_interval=interval, max_lines=1000) as ibkr_sim,
        open_tastytrade_sim(contracts=book, tick_interval=interval, events_per_frame=1) as tt,
        open_pipeline(db_url) as pipeline,  # the service defaults (FLUSH_ROWS / FLUSH_MS)
        trio.open_nursery() as nursery,
    ):
        supervisor = Supervisor(pipeline.sink, backoff_factory=lambda: Backoff(0.05, 0.5))
        supervisor.add(IbkrStream(ibkr_sim.url, rest_min_interval=0.0, max_lines=1000))
        api = TastytradeApi(tt.secret, tt.refresh_token, api_url=tt.api_url)
        supervisor.add(TastytradeStream(api))
        await nursery.start(supervisor.run)
        await wait_until(
            lambda: all(s.ticks > 0 for s in supervisor.registry.values()),
            timeout=30,
            what="both brokers streaming",
        )
        await trio.sleep(seconds)  # the soak itself
        nursery.cancel_scope.cancel()
    stats = pipeline.writer.stats
    pct = stats.latency.percentiles(datetime.now(UTC).timestamp())
    by_broker = dict(fetch_rows(db_url, "SELECT broker, count(*) FROM greek_snapshots GROUP BY 1"))
    report = {
        "seconds": seconds,
        "contracts": CONTRACTS,
        "ticks": {name: s.ticks for name, s in supervisor.registry.items()},
        "rows": by_broker,
        "accepted": pipeline.sink.accepted,
        "conflated": pipeline.sink.conflated,
        "restarts": {name: s.restarts for name, s in supervisor.registry.items()},
        "latency_ms_last_minute": {"p50": pct[0.5], "p95": pct[0.95], "p99": pct[0.99]},
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"soak-{int(seconds)}s.json").write_text(json.dumps(report, indent=2))
    print(f"\nsoak report: {json.dumps(report)}")
    return report


def _check(report: dict[str, object], seconds: float) -> None:
    ticks = report["ticks"]
    assert isinstance(ticks, dict)
    for broker in ("ibkr", "tastytrade"):
        assert ticks[broker] >= 0.5 * TICKS_PER_S * seconds, f"{broker} under-delivered"
    assert report["rows"] == ticks, "100% of accepted ticks persisted"
    assert report["accepted"] == sum(ticks.values()) and report["conflated"] == 0
    assert report["restarts"] == {"ibkr": 0, "tastytrade": 0}


@pytest.mark.slow
async def test_soak_one_minute(db_url: str) -> None:
    _check(await _soak(db_url, 60.0), 60.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_soak_ten_minutes(db_url: str) -> None:
    _check(await _soak(db_url, 600.0), 600.0)
