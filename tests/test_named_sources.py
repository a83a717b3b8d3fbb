"""Several sources in one instance, configured by a settings file, through the real
service into PostgreSQL: two IBKR gateways (`ibkr:alice`, `ibkr:bob`, different
accounts) and a Tastytrade login (`tastytrade:main`), each its own stream, status entry
and `source` on its rows; the API filters by source and instance. Then a recording made
with named sources replays to the same sources."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import trio

from greeksd.cli import build_sources
from greeksd.config import Settings, load_settings
from greeksd.model import ContractKey
from greeksd.recording import CountingSink, record_session
from greeksd.replay import replay_fixture
from greeksd.service import open_service
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import TastytradeSim, open_tastytrade_sim
from tests.helpers import fetch_rows, wait_until

TICKS = 40  # per simulator

Simulators = tuple[IbkrGatewaySim, IbkrGatewaySim, TastytradeSim]


@asynccontextmanager
async def _three_simulators() -> AsyncIterator[
    tuple[IbkrGatewaySim, IbkrGatewaySim, TastytradeSim]
]:
    """Two gateways with their own accounts and a Tastytrade API, silent until told to
    tick, so what each sent is exactly known."""
    book = default_contracts(datetime.now(UTC).date(), 4)
    async with (
        open_ibkr_sim(book, tick_interval=None, heartbeat_s=3600.0, account="U-ALICE") as alice,
        open_ibkr_sim(book, tick_interval=None, heartbeat_s=3600.0, account="U-BOB") as bob,
        open_tastytrade_sim(contracts=book, tick_interval=3600.0, nan_rho_rate=0.0) as tasty,
    ):
        yield alice, bob, tasty


def _settings_file(
    path: Path, alice: IbkrGatewaySim, bob: IbkrGatewaySim, tasty: TastytradeSim
) -> Path:
    path.write_text(
        f"""
instance = "desk-7"

[[sources]]
broker = "ibkr"
name = "alice"
url = "{alice.url}"
ca_file = "{alice.ca_file}"

[[sources]]
broker = "ibkr"
name = "bob"
url = "{bob.url}"
ca_file = "{bob.ca_file}"

[[sources]]
broker = "tastytrade"
name = "main"
api_url = "{tasty.api_url}"
secret = "{tasty.secret}"
refresh = "{tasty.refresh_token}"
"""
    )
    path.chmod(0o600)
    return path


def _load(tmp_path: Path, config: Path, db_url: str | None = None) -> Settings:
    env = {"GREEKSD_CONFIG_FILE": str(config), "GREEKSD_DATA_DIR": str(tmp_path)}
    if db_url is not None:
        env |= {"GREEKSD_DATABASE_URL": db_url, "GREEKSD_API_PORT": "0", "GREEKSD_FLUSH_MS": "20"}
    return load_settings(env, dotenv_path=tmp_path / "none.env")


def _sent(alice: IbkrGatewaySim, bob: IbkrGatewaySim, tasty: TastytradeSim) -> dict[str, int]:
    """Every option update each simulator sent so far (first images included): one row
    each when nothing is lost (the same count the benchmark compares)."""
    return {
        "ibkr:alice": sum(1 for t in alice.sent_ticks if t.key is not None),
        "ibkr:bob": sum(1 for t in bob.sent_ticks if t.key is not None),
        "tastytrade:main": len(tasty.sent_events),
    }


async def _tick(alice: IbkrGatewaySim, bob: IbkrGatewaySim, tasty: TastytradeSim) -> None:
    """Once every simulator streams to its client: TICKS ticks each."""
    keys: list[ContractKey] = [c.key for c in alice.market.contracts]
    await wait_until(
        lambda: alice.subscribed(keys) and bob.subscribed(keys) and tasty.subscribed(keys),
        timeout=30,
        what="every simulator's contracts subscribed",
    )
    for _ in range(TICKS):
        alice.tick()
        bob.tick()
    await tasty.dxlink.publish([tasty.market.next_tick() for _ in range(TICKS)])


def _rows_by_source(db_url: str) -> dict[str, int]:
    return dict(fetch_rows(db_url, "SELECT source, count(*) FROM greek_snapshots GROUP BY 1"))


async def test_one_instance_runs_two_gateways_and_a_tastytrade_login(
    db_url: str, tmp_path: Path
) -> None:
    async with _three_simulators() as (alice, bob, tasty):
        config = _settings_file(tmp_path / "desk.toml", alice, bob, tasty)
        settings = _load(tmp_path, config, db_url)
        names = [s.name for s in settings.sources()]
        assert names == ["ibkr:alice", "ibkr:bob", "tastytrade:main"]
        async with open_service(settings, build_sources(settings)) as service:
            await _tick(alice, bob, tasty)
            registry = service.state.supervisor.registry
            await wait_until(
                lambda: (
                    {n: s.ticks for n, s in registry.items()} == _sent(alice, bob, tasty)
                    and service.state.writer.stats.rows_written == service.state.sink.accepted
                ),
                timeout=30,
                what="every update each simulator sent received and written",
            )
            sent = _sent(alice, bob, tasty)
            async with httpx.AsyncClient(base_url=service.api_url, timeout=10) as client:
                status = (await client.get("/v1/streaming/status")).json()
                only_alice = (
                    await client.get(
                        "/v1/greeks/snapshots", params={"source": "ibkr:alice", "limit": "50000"}
                    )
                ).json()["rows"]
                other_instance = (
                    await client.get("/v1/greeks/latest", params={"instance": "desk-8"})
                ).json()["rows"]
                bad = await client.get("/v1/greeks/latest", params={"source": "etrade:x"})
                bad_name = await client.get("/v1/greeks/latest", params={"source": "ibkr:A b"})
                bad_instance = await client.get(
                    "/v1/greeks/snapshots", params={"instance": "desk 7"}
                )
    assert all(count >= TICKS for count in sent.values()), sent
    assert _rows_by_source(db_url) == sent
    assert _accounts(db_url) == {"ibkr:alice": "U-ALICE", "ibkr:bob": "U-BOB"}
    assert fetch_rows(db_url, "SELECT DISTINCT instance FROM greek_snapshots") == [("desk-7",)]
    assert status["instance"] == "desk-7"
    assert set(status["streams"]) == set(names)
    assert all(s["state"] == "connected" for s in status["streams"].values()), status
    assert {n: s["ticks"] for n, s in status["streams"].items()} == sent
    assert len(only_alice) == sent["ibkr:alice"]
    assert {(r["source"], r["account_id"], r["instance"]) for r in only_alice} == {
        ("ibkr:alice", "U-ALICE", "desk-7")
    }
    assert other_instance == []
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_source")
    assert (bad_name.status_code, bad_name.json()["error"]) == (400, "bad_source")
    assert (bad_instance.status_code, bad_instance.json()["error"]) == (400, "bad_instance")


def _accounts(db_url: str) -> dict[str, str]:
    return dict(
        fetch_rows(
            db_url,
            "SELECT DISTINCT source, account_id FROM greek_snapshots WHERE broker = 'ibkr'",
        )
    )


async def test_a_recording_with_named_sources_replays_to_the_same_sources(
    db_url: str, tmp_path: Path
) -> None:
    fixture = tmp_path / "desk.jsonl"
    received = CountingSink()
    async with _three_simulators() as (alice, bob, tasty):
        settings = _load(tmp_path, _settings_file(tmp_path / "desk.toml", alice, bob, tasty))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    record_session,
                    partial(build_sources, settings),
                    fixture,
                    [s.name for s in settings.sources()],
                    sink=received,
                )
            )
            await _tick(alice, bob, tasty)
            await wait_until(
                lambda: received.rows == _sent(alice, bob, tasty),
                timeout=30,
                what="every update recorded",
            )
            sent = _sent(alice, bob, tasty)
            nursery.cancel_scope.cancel()
    stats = await replay_fixture(db_url, fixture, instance="replayer")
    assert _rows_by_source(db_url) == sent
    assert stats.rows_written == sum(sent.values())
    assert _accounts(db_url) == {"ibkr:alice": "U-ALICE", "ibkr:bob": "U-BOB"}
    assert fetch_rows(db_url, "SELECT DISTINCT instance FROM greek_snapshots") == [("replayer",)]


async def test_probing_a_named_source_keeps_its_reports_apart(tmp_path: Path) -> None:
    """`greeksd probe ibkr:alice` probes alice's gateway and writes into a folder of its
    own, so probing bob into the same --out does not overwrite alice's report."""
    book = default_contracts(datetime.now(UTC).date(), 2)
    async with (
        open_ibkr_sim(book, tick_interval=0.02, account="U-ALICE") as alice,
        open_ibkr_sim(book, tick_interval=0.02, account="U-BOB") as bob,
        open_tastytrade_sim(contracts=book) as tasty,
    ):
        config = _settings_file(tmp_path / "greeksd.toml", alice, bob, tasty)
        config.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GREEKSD_")}
        env |= {"GREEKSD_CONFIG_FILE": str(config), "GREEKSD_DATA_DIR": str(tmp_path)}
        out = tmp_path / "reports"
        for source in ("ibkr:alice", "ibkr:bob"):
            command = [sys.executable, "-m", "greeksd.cli", "probe", source]
            done = await trio.run_process(
                [*command, "--duration", "1", "--out", str(out)],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr.decode()[-2000:]
    summaries = {
        name: json.loads((out / name / "ibkr-probe.json").read_text())
        for name in ("ibkr-alice", "ibkr-bob")
    }
    assert summaries["ibkr-alice"]["url"] == alice.url
    assert summaries["ibkr-bob"]["url"] == bob.url
    assert not (out / "ibkr-probe.json").exists()
