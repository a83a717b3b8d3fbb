"""Interactive Brokers (Client Portal Gateway websocket), as greeksd sees it: `SPEC`.

The factories import the client, the probe and the simulator only when called (see
greeksd.brokers.spec): the configuration reads this module at every start.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from greeksd.brokers.spec import BenchEntry, BenchSim, BrokerSpec, Replayer, SimEntry
from greeksd.model import Broker, Recorder, Source
from greeksd.settings_table import (
    boolean,
    optional_path,
    positive_float,
    positive_int,
    setting,
)
from greeksd.sim.market import SimContract

DEMO_TICK_S = 0.1
"""~10 option updates/s in the demo (one contract per tick): lively, nowhere near what
the writer takes."""


@dataclass(frozen=True)
class IbkrSettings:
    """`GREEKSD_IBKR_*`."""

    url: str = setting("https://localhost:5000", str, "Client Portal Gateway base URL")
    ca_file: Path | None = setting("", optional_path, "CA bundle to verify the gateway with")
    verify_tls: bool = setting("0", boolean, "verify the gateway certificate even on localhost")
    heartbeat_s: float = setting("60", positive_float, "seconds between websocket `tic`s")
    positions_refresh_s: float = setting(
        "60", positive_float, "seconds between IBKR position refreshes"
    )
    max_lines: int = setting(
        "100", positive_int, "concurrent market-data lines the IBKR account allows"
    )


def _stream(name: str, settings: IbkrSettings, recorder: Recorder | None) -> Source:
    from greeksd.brokers.ibkr.stream import IbkrStream

    return IbkrStream.from_settings(settings, recorder, name=name)


def _replayer() -> Replayer:
    from greeksd.brokers.ibkr.connection import replay_connection
    from greeksd.recording import option_position_from_json
    from greeksd.replay import ConnectionReplayer

    return ConnectionReplayer(
        replay_connection,
        lambda body: [option_position_from_json(dict(p)) for p in body["positions"]],
    )


async def _probe(settings: IbkrSettings, duration_s: float, out_dir: Path) -> int:
    from greeksd.brokers.ibkr.probe import run_ibkr_probe

    return await run_ibkr_probe(settings, duration_s=duration_s, out_dir=out_dir)


def _sim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=5000, help="HTTPS port")
    parser.add_argument("--contracts", type=int, default=8, help="option positions held")
    parser.add_argument(
        "--tick-interval", type=float, default=0.2, help="seconds between market-data updates"
    )


async def _serve_sim(args: argparse.Namespace) -> None:
    from greeksd.sim.ibkr_gateway import run_ibkr_sim

    print(
        f"IBKR gateway simulator on https://{args.host}:{args.port} (Ctrl-C to stop)",
        flush=True,
    )
    await run_ibkr_sim(
        args.port, host=args.host, contracts=args.contracts, tick_interval=args.tick_interval
    )


@asynccontextmanager
async def _demo(book: Sequence[SimContract], settings: IbkrSettings) -> AsyncIterator[IbkrSettings]:
    from greeksd.sim.ibkr_gateway import open_ibkr_sim

    async with open_ibkr_sim(book, tick_interval=DEMO_TICK_S) as sim:
        yield replace(settings, url=sim.url, ca_file=sim.ca_file)


def _bench_records(
    book: Sequence[SimContract], count: int, start_ms: int
) -> Iterator[dict[str, Any]]:
    from greeksd.bench.fixture import ibkr_records

    return ibkr_records(book, count, start_ms)


def _bench_sim(
    book: Sequence[SimContract], settings: IbkrSettings
) -> AbstractAsyncContextManager[BenchSim[IbkrSettings]]:
    from greeksd.bench.sims import open_ibkr

    return open_ibkr(book, settings)


SPEC = BrokerSpec(
    name=Broker.IBKR.value,
    settings=IbkrSettings,
    prefix="IBKR_",
    stream=_stream,
    replayer=_replayer,
    probe=_probe,
    sim=SimEntry(
        help="a protocol-faithful fake Client Portal Gateway (HTTPS + websocket, self-signed cert)",
        add_arguments=_sim_arguments,
        serve=_serve_sim,
        demo=_demo,
    ),
    trades=True,
    bench=BenchEntry(records=_bench_records, e2e=_bench_sim),
)
