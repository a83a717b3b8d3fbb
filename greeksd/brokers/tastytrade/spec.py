"""Tastytrade (REST + dxFeed DXLink websocket), as greeksd sees it: `SPEC`.

The factories import the client (and the tastytrade SDK), the probe and the simulator
only when called (see greeksd.brokers.spec): the configuration reads this module at
every start.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from greeksd.brokers.spec import BenchEntry, BenchSim, BrokerSpec, Replayer, SimEntry
from greeksd.model import Broker, Recorder, Source
from greeksd.settings_table import optional_str, positive_float, setting
from greeksd.sim.market import SimContract

DEMO_TICK_S = 0.2
"""~15 option updates/s in the demo (three events per frame)."""


@dataclass(frozen=True)
class TastytradeSettings:
    """`GREEKSD_TT_*`."""

    secret: str | None = setting("", optional_str, "Tastytrade OAuth provider secret", secret=True)
    refresh: str | None = setting("", optional_str, "Tastytrade OAuth refresh token", secret=True)
    account: str | None = setting(
        "", optional_str, "Tastytrade account number (unset: every account)"
    )
    api_url: str | None = setting(
        "", optional_str, "Tastytrade REST base URL override (the simulator)"
    )
    positions_refresh_s: float = setting(
        "60", positive_float, "seconds between Tastytrade position refreshes"
    )


def _stream(name: str, settings: TastytradeSettings, recorder: Recorder | None) -> Source:
    from greeksd.brokers.tastytrade.stream import TastytradeStream

    return TastytradeStream.from_settings(settings, recorder, name=name)


def _replayer() -> Replayer:
    from greeksd.brokers.tastytrade import connection as dxlink
    from greeksd.brokers.tastytrade.protocol import Positions
    from greeksd.recording import contract_from_json
    from greeksd.replay import ConnectionReplayer

    def positions(body: Mapping[str, Any]) -> Positions:
        return Positions.from_record([contract_from_json(c) for c in body["positions"]], body)

    return ConnectionReplayer(dxlink.replaying(), positions)


async def _probe(settings: TastytradeSettings, duration_s: float, out_dir: Path) -> int:
    from greeksd.brokers.tastytrade.probe import run_tastytrade_probe

    return await run_tastytrade_probe(settings, duration_s=duration_s, out_dir=out_dir)


def _sim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5000, help="HTTP port of the REST API")
    parser.add_argument(
        "--ws-port", type=int, default=0, help="DXLink websocket port (0 = any free port)"
    )
    parser.add_argument(
        "--tick-interval", type=float, default=0.2, help="seconds between market-data updates"
    )
    parser.add_argument(
        "--futures-options", type=int, default=0, help="futures options added to the book"
    )


async def _serve_sim(args: argparse.Namespace) -> None:
    from greeksd.sim.tastytrade_api import run_tastytrade_sim

    await run_tastytrade_sim(
        args.port,
        ws_port=args.ws_port,
        tick_interval=args.tick_interval,
        futures_options=args.futures_options,
    )


@asynccontextmanager
async def _demo(
    book: Sequence[SimContract], settings: TastytradeSettings
) -> AsyncIterator[TastytradeSettings]:
    from greeksd.sim.tastytrade_api import open_tastytrade_sim

    async with open_tastytrade_sim(contracts=book, tick_interval=DEMO_TICK_S) as sim:
        yield replace(
            settings,
            api_url=sim.api_url,
            secret=sim.secret,
            refresh=sim.refresh_token,
            account=None,
        )


def _bench_records(
    book: Sequence[SimContract], count: int, start_ms: int
) -> Iterator[dict[str, Any]]:
    from greeksd.bench.fixture import dxlink_records

    return dxlink_records(book, count, start_ms)


def _bench_sim(
    book: Sequence[SimContract], settings: TastytradeSettings
) -> AbstractAsyncContextManager[BenchSim[TastytradeSettings]]:
    from greeksd.bench.sims import open_dxlink

    return open_dxlink(book, settings)


SPEC = BrokerSpec(
    name=Broker.TASTYTRADE.value,
    settings=TastytradeSettings,
    prefix="TT_",
    stream=_stream,
    replayer=_replayer,
    probe=_probe,
    sim=SimEntry(
        help="a fake Tastytrade REST API + DXLink server; prints the GREEKSD_TT_* values to use",
        add_arguments=_sim_arguments,
        serve=_serve_sim,
        demo=_demo,
    ),
    trades=True,
    bench=BenchEntry(records=_bench_records, e2e=_bench_sim),
)
