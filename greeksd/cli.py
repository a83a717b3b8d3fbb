"""`greeksd` command line: run, demo, db (later: replay, record, probe, sim)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import trio

from greeksd.config import ConfigError, Settings, load_settings, parse_brokers
from greeksd.logs import configure_logging, get_logger
from greeksd.model import Source
from greeksd.service import (
    RunningService,
    check_api_exposure,
    database_url,
    run_until_signal,
)
from greeksd.store.database import DatabaseUnavailable
from greeksd.store.migrations import MigrationError, migrate, status

log = get_logger("greeksd.cli")

EXIT_CONFIG = 2


def build_sources(settings: Settings) -> list[Source]:
    """One source per configured broker name."""
    sources: list[Source] = []
    for name in settings.brokers:
        if name == "synthetic":
            from greeksd.sim.market import SyntheticMarket, default_contracts
            from greeksd.sim.synthetic import SyntheticSource

            today = datetime.now(UTC).date()
            sources.append(SyntheticSource(SyntheticMarket(default_contracts(today), as_of=today)))
        elif name == "ibkr":
            from greeksd.brokers.ibkr.stream import IbkrStream

            sources.append(IbkrStream.from_settings(settings))
        elif name == "tastytrade":
            from greeksd.brokers.tastytrade.stream import TastytradeStream

            sources.append(TastytradeStream.from_settings(settings))
        else:
            raise ConfigError(f"broker {name!r} is not available in this build yet")
    return sources


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if args.brokers:
        try:
            brokers = parse_brokers(args.brokers)
        except ValueError as exc:
            raise ConfigError(f"invalid --brokers={args.brokers!r}: {exc}") from None
        settings = replace(settings, brokers=brokers)
    check_api_exposure(settings)
    return trio.run(partial(run_until_signal, settings, build_sources(settings)))


def _status_line(service: RunningService) -> str:
    status = service.state.status_json()
    streams = " ".join(f"{name}={s['state']}" for name, s in status["streams"].items())
    writer = status["writer"]
    p95 = writer["latency_ms"]["p95"]
    return (
        f"{streams} rows={writer['rows_written']} queue={writer['queue_depth']} "
        f"p95_ms={'-' if p95 is None else f'{p95:.1f}'}"
    )


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    settings = replace(settings, brokers=("synthetic",))
    check_api_exposure(settings)

    async def report(service: RunningService) -> None:
        print(f"greeksd demo: dashboard and API at {service.api_url}", flush=True)
        print(f"  try: curl {service.api_url}/v1/streaming/status", flush=True)
        with trio.move_on_after(args.duration if args.duration else float("inf")):
            while True:
                await trio.sleep(args.status_every)
                print(_status_line(service), flush=True)
        print("demo finished: " + _status_line(service), flush=True)

    return trio.run(
        partial(run_until_signal, settings, build_sources(settings), while_running=report)
    )


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    with database_url(settings) as url:
        if args.db_command == "migrate":
            applied = migrate(url)
            print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        else:
            for version, done in status(url):
                print(f"{version}\t{'applied' if done else 'pending'}")
    return 0


def _cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    if args.broker == "ibkr":
        from greeksd.sim.ibkr_gateway import run_ibkr_sim

        print(
            f"IBKR gateway simulator on https://{args.host}:{args.port} (Ctrl-C to stop)",
            flush=True,
        )
        main = partial(
            run_ibkr_sim,
            args.port,
            host=args.host,
            contracts=args.contracts,
            tick_interval=args.tick_interval,
        )
    else:
        from greeksd.sim.tastytrade_api import run_tastytrade_sim

        main = partial(
            run_tastytrade_sim, args.port, ws_port=args.ws_port, tick_interval=args.tick_interval
        )
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)
    return 0


def _cmd_probe(args: argparse.Namespace, settings: Settings) -> int:
    if args.broker == "ibkr":
        from greeksd.brokers.ibkr.probe import run_ibkr_probe as run_probe
    else:
        from greeksd.brokers.tastytrade.probe import run_tastytrade_probe as run_probe
    code = int(
        trio.run(partial(run_probe, settings, duration_s=args.duration, out_dir=Path(args.out)))
    )
    print(f"probe {args.broker}: {'ok' if code == 0 else 'NO GREEKS'}; reports in {args.out}/")
    return code


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from greeksd.bench import run_benchmarks

    return run_benchmarks(args.database_url or settings.database_url, Path(args.out))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greeksd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run the service in the foreground",
        description="Stream Greeks from the configured brokers into "
        "PostgreSQL and serve the HTTP API until SIGINT/SIGTERM.",
    )
    run.add_argument(
        "--brokers", help="comma-separated subset, e.g. ibkr (default: GREEKSD_BROKERS)"
    )
    run.set_defaults(handler=_cmd_run)

    demo = commands.add_parser(
        "demo",
        help="simulated brokers + embedded database + service",
        description="Run the whole service against simulated brokers.",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (0 = until Ctrl-C)",
    )
    demo.add_argument(
        "--status-every", type=float, default=5.0, help="seconds between status lines"
    )
    demo.set_defaults(handler=_cmd_demo)

    db = commands.add_parser("db", help="database schema commands")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("migrate", help="apply pending schema migrations").set_defaults(
        handler=_cmd_db
    )
    db_commands.add_parser("status", help="list migrations and whether applied").set_defaults(
        handler=_cmd_db
    )
    sim = commands.add_parser(
        "sim",
        help="run a broker simulator alone",
        description="Serve a protocol-faithful broker simulator.",
    )
    sim.add_argument("broker", choices=["ibkr", "tastytrade"])
    sim.add_argument("--host", default="127.0.0.1", help="bind address (ibkr)")
    sim.add_argument("--port", type=int, default=5000, help="HTTP(S) port")
    sim.add_argument(
        "--ws-port",
        type=int,
        default=0,
        help="DXLink websocket port (tastytrade; 0 = any free port)",
    )
    sim.add_argument("--contracts", type=int, default=8, help="option positions held (ibkr)")
    sim.add_argument(
        "--tick-interval", type=float, default=0.2, help="seconds between market-data updates"
    )
    sim.set_defaults(handler=_cmd_sim)

    probe = commands.add_parser(
        "probe",
        help="check a broker connection and Greek coverage",
        description="Connect, subscribe the option positions for a "
        "bounded time, write a JSON summary and a per-contract coverage "
        "CSV; exit 1 when no Greeks arrived.",
    )
    probe.add_argument("broker", choices=["ibkr", "tastytrade"])
    probe.add_argument("--duration", type=float, default=30.0, help="seconds to listen")
    probe.add_argument("--out", default="probe-results", help="directory for the reports")
    probe.set_defaults(handler=_cmd_probe)

    bench = commands.add_parser("bench", help="run the benchmarks, print tables, write JSON")
    bench.add_argument(
        "--database-url",
        help="benchmark against this server (default: a temporary embedded PostgreSQL)",
    )
    bench.add_argument("--out", default="bench-results/latest.json", help="JSON output path")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"greeksd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    try:
        return int(args.handler(args, settings))
    except ConfigError as exc:
        print(f"greeksd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DatabaseUnavailable, MigrationError) as exc:
        log.error("database_unavailable", error=str(exc))
        print(f"greeksd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
