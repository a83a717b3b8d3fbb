"""Adding a broker is one package and one registry line: the toy broker, defined only in
the test suite (tests/toy_broker.py), registered with one line, configured by its own
GREEKSD_TOY_* variables, run by the real service (embedded PostgreSQL, real pipeline,
HTTP on a socket), recorded and replayed like the built-in brokers."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from greeksd.brokers import registry
from greeksd.cli import build_sources, make_parser
from greeksd.config import all_settings, load_settings
from greeksd.recording import read_fixture, record_session
from greeksd.replay import replay_fixture
from greeksd.service import RunningService, run_until_signal
from greeksd.settings_table import ConfigError
from tests import toy_broker
from tests.helpers import ListSink, fetch_rows, wait_until
from tests.toy_broker import ToySettings, open_toy_server, toy_book

T0 = 1_900_000_000_000  # ms


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry.SPECS, toy_broker.NAME, toy_broker.SPEC)  # the one line
    yield


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"GREEKSD_DATA_DIR": str(tmp_path), "GREEKSD_BROKERS": "toy", **values}


def test_an_unregistered_broker_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown broker\(s\) toy; use ibkr, tastytrade"):
        load_settings(_env(tmp_path), dotenv_path=tmp_path / "none.env")


def test_a_registered_broker_brings_its_own_settings(toy_registered: None, tmp_path: Path) -> None:
    settings = load_settings(
        _env(tmp_path, GREEKSD_TOY_URL="ws://toy.example:81"), dotenv_path=tmp_path / "none.env"
    )
    assert settings.brokers == ("toy",)
    assert settings.broker(toy_broker.SPEC) == ToySettings("ws://toy.example:81", 5.0)
    assert [s.name for s in all_settings()][-2:] == ["TOY_URL", "TOY_PING_S"]
    with pytest.raises(ConfigError, match="invalid GREEKSD_TOY_PING_S='soon'"):
        load_settings(_env(tmp_path, GREEKSD_TOY_PING_S="soon"), dotenv_path=tmp_path / "x")
    # it has no simulator and no probe, so those commands do not offer it
    for command in (["sim", "toy"], ["probe", "toy"]):
        with pytest.raises(SystemExit):
            make_parser().parse_args(command)


async def test_the_service_runs_a_broker_defined_only_in_the_tests(
    toy_registered: None, db_url: str, tmp_path: Path
) -> None:
    book = toy_book()
    async with open_toy_server(book) as server:
        settings = load_settings(
            _env(
                tmp_path,
                GREEKSD_TOY_URL=server.url,
                GREEKSD_DATABASE_URL=db_url,
                GREEKSD_API_PORT="0",
                GREEKSD_FLUSH_MS="20",
            ),
            dotenv_path=tmp_path / "none.env",
        )
        seen: dict[str, Any] = {}

        async def exercise(service: RunningService) -> None:
            await wait_until(lambda: bool(server.ops("subscribe")), what="toy subscribed")
            await server.tick(book[0], 0.42, T0)
            await server.send("garbage")
            await server.tick(book[1], -0.31, T0 + 1)
            await wait_until(
                lambda: service.state.writer.stats.rows_written == 2, what="both rows written"
            )
            async with httpx.AsyncClient(base_url=service.api_url, timeout=10) as http:
                seen["status"] = (await http.get("/v1/streaming/status")).json()
                seen["rows"] = (
                    await http.get("/v1/greeks/snapshots", params={"broker": "toy"})
                ).json()

        sources = build_sources(settings)
        assert await run_until_signal(settings, sources, while_running=exercise) == 0

    toy = seen["status"]["streams"]["toy"]
    assert list(seen["status"]["streams"]) == ["toy"]
    assert (toy["state"], toy["ticks"], toy["rejected_frames"], toy["subscriptions"]) == (
        "connected",
        2,
        1,
        2,
    )
    stored = fetch_rows(
        db_url,
        "SELECT broker, account_id, contract_key, delta FROM greek_snapshots ORDER BY event_time",
    )
    assert stored == [
        ("toy", "TOY-1", book[0].key_text, 0.42),
        ("toy", "TOY-1", book[1].key_text, -0.31),
    ]
    assert [(r["broker"], r["delta"]) for r in seen["rows"]["rows"]] == [
        ("toy", 0.42),
        ("toy", -0.31),
    ]


async def test_a_recorded_toy_session_replays_into_the_same_rows(
    toy_registered: None, db_url: str, tmp_path: Path
) -> None:
    book, out, sink = toy_book(), tmp_path / "toy.jsonl", ListSink()
    async with open_toy_server(book) as server:
        settings = load_settings(
            _env(tmp_path, GREEKSD_TOY_URL=server.url), dotenv_path=tmp_path / "none.env"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(record_session, partial(build_sources, settings), out, ["toy"], sink=sink)
            )
            await wait_until(lambda: bool(server.ops("subscribe")), what="toy subscribed")
            await server.tick(book[0], 0.11, T0)
            await server.send({"op": "dance"})
            await server.tick(book[1], 0.22, T0 + 1)
            await wait_until(lambda: len(sink.rows) == 2, what="both rows recorded")
            nursery.cancel_scope.cancel()
    _, records = read_fixture(out)
    assert [r.kind for r in records][:2] == ["link", "frame"]  # then positions, frames

    stats = await replay_fixture(db_url, out)
    assert (stats.snapshots, stats.rows_written, stats.rejected_events) == (2, 2, 1)
    stored = fetch_rows(
        db_url,
        "SELECT contract_key, delta, event_time, received_at FROM greek_snapshots "
        "ORDER BY event_time",
    )
    assert stored == [(r.contract_key, r.delta, r.event_time, r.received_at) for r in sink.rows]
