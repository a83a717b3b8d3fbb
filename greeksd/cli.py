"""`greeksd` command line: run, demo, record, replay, archive, db, sim, probe, config,
bench."""

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

from greeksd import heap
from greeksd.bench import SECTIONS
from greeksd.brokers import registry
from greeksd.config import Settings, load_settings, parse_database_url
from greeksd.logs import configure_logging, get_logger
from greeksd.model import Recorder, Source
from greeksd.redact import database_passwords, register_secret
from greeksd.service import (
    check_api_exposure,
    database_url,
    run_until_signal,
)
from greeksd.settings_table import ConfigError
from greeksd.sources import broker_of, parse_source
from greeksd.store.database import DatabaseUnavailable
from greeksd.store.migrations import MigrationError, migrate, status

log = get_logger("greeksd.cli")

EXIT_CONFIG = 2


def build_sources(settings: Settings, recorder: Recorder | None = None) -> list[Source]:
    """One stream per configured source (greeksd.sources), built by its broker's spec
    from the source's settings (and recording to `recorder`, for `greeksd record`)."""
    return [
        source.spec.stream(source.name, source.settings, recorder) for source in settings.sources()
    ]


def _only(settings: Settings, option: str | None) -> Settings:
    """`--brokers`: only these sources (a broker's name is its default source)."""
    if not option:
        return settings
    names = tuple(part.strip() for part in option.split(",") if part.strip())
    try:
        return settings.select(names)
    except ConfigError as exc:
        raise ConfigError(f"invalid --brokers={option!r}: {exc}") from None


def _database_url_option(value: str | None) -> str | None:
    """`--database-url`, held to the same rules as GREEKSD_DATABASE_URL (and never
    echoed: it may hold a password)."""
    if value is None:
        return None
    try:
        url = parse_database_url(value.strip())
    except ValueError as exc:
        raise ConfigError(f"invalid --database-url=<redacted>: {exc}") from None
    for password in database_passwords(url or ""):
        register_secret(password)
    return url


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    settings = _only(settings, args.brokers)
    check_api_exposure(settings)
    sources = build_sources(settings)
    heap.settle()
    return trio.run(partial(run_until_signal, settings, sources))


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from greeksd.demo import run_demo

    check_api_exposure(settings)
    return trio.run(
        partial(
            run_demo,
            settings,
            build_sources,
            duration_s=args.duration,
            status_every_s=args.status_every,
        )
    )


def _cmd_record(args: argparse.Namespace, settings: Settings) -> int:
    from greeksd.recording import record_session

    settings = _only(settings, args.brokers)
    names = [source.name for source in settings.sources()]
    for source in settings.sources():
        if source.spec.replayer is None:  # nothing could read its frames back
            raise ConfigError(f"broker {source.spec.name!r} has no raw frames to record")
    for secret in settings.secrets():
        register_secret(secret)
    out = Path(args.out)
    print(f"recording {', '.join(names)} to {out} (Ctrl-C to stop)", flush=True)
    counts, statuses = trio.run(
        partial(
            record_session,
            partial(build_sources, settings),
            out,
            names,
            duration_s=args.duration,
        )
    )
    print(f"recorded {out}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for name, s in statuses.items():
        print(f"  {name}: {s.state.value} ticks={s.ticks} rejected_frames={s.rejected_frames}")
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from greeksd.recording import FixtureError
    from greeksd.replay import replay_fixture
    from greeksd.replay_parts import ReplayPartFailed, stop_on_signals

    if option := _database_url_option(args.database_url):
        settings = replace(settings, database_url=option)
    if args.speed < 0:
        raise ConfigError("--speed must be 0 (as fast as possible) or a positive factor")
    if args.processes < 0:
        raise ConfigError("--processes must be 0 (one per CPU) or a positive count")
    with database_url(settings) as url:
        migrate(url)
        heap.settle()
        replay = partial(
            replay_fixture,
            url,
            Path(args.fixture),
            speed=args.speed,
            instance=settings.instance,
            store_payload=settings.store_payload,
            compact=settings.compact_partitions,
            processes=args.processes,
        )
        try:
            stats, code = trio.run(partial(stop_on_signals, lambda stop: replay(stop=stop)))
        except (FixtureError, OSError, ReplayPartFailed) as exc:
            print(f"greeksd replay: {exc}", file=sys.stderr)
            return 1
    if stats is None:
        print(
            f"greeksd replay: interrupted twice; rows not yet committed were dropped, "
            f"replay {args.fixture} again to complete it",
            file=sys.stderr,
        )
        return code
    if code:
        print(
            f"greeksd replay: stopped early; what it read is committed, replay "
            f"{args.fixture} again to complete it",
            file=sys.stderr,
        )
    print(f"replayed {args.fixture}: {stats.summary()}")
    return code


def _cmd_archive_frames(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from greeksd.archive_frames import find_frames
    from greeksd.model import ContractKey

    try:
        parse_source(args.source)
        key = str(ContractKey.parse(args.contract))
        at = datetime.fromisoformat(args.at)
    except ValueError as exc:
        raise ConfigError(f"greeksd archive frames: {exc}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    root = Path(args.archive_dir) if args.archive_dir else settings.data_dir / "archive"
    exact = 0
    for match in find_frames(root, args.source, key, at, args.window_s):
        exact += match.exact
        sys.stdout.write(orjson.dumps(match.as_json()).decode() + "\n")
    if not exact:
        print(
            f"greeksd archive frames: no frame of {args.source} received at {at.isoformat()} "
            f"yielded a row for {key} (archive: {root})",
            file=sys.stderr,
        )
        return 1
    return 0


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
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(args.sim.serve, args)
    return 0


def _cmd_probe(args: argparse.Namespace, settings: Settings) -> int:
    source = settings.source(args.source)
    for secret in settings.secrets():
        register_secret(secret)
    probe = source.spec.probe
    assert probe is not None  # the parser accepts only brokers with a probe
    # a named source's reports go into a folder of its own, so probing two logins of
    # one broker into the same --out keeps both (the files are named by broker)
    out = Path(args.out)
    if args.source != source.spec.name:
        out = out / args.source.replace(":", "-")
    code = int(trio.run(probe, source.settings, args.duration, out))
    print(f"probe {args.source}: {'ok' if code == 0 else 'NO GREEKS'}; reports in {out}/")
    return code


def _probe_target(text: str) -> str:
    """A source name whose broker has a probe (whether a named one is configured is
    checked against the settings)."""
    try:
        parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    spec = registry.SPECS[broker_of(text)]
    if spec.probe is None:
        raise argparse.ArgumentTypeError(f"broker {spec.name!r} has no probe")
    return text


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    from greeksd.settings_show import show_settings

    print(show_settings(settings), end="")
    return 0


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from greeksd.bench import run_benchmarks

    url = _database_url_option(args.database_url) or settings.database_url
    only = args.only or SECTIONS
    return run_benchmarks(url, Path(args.out), quick=args.quick, scale=args.scale, only=only)


def _add_duration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (0 = until Ctrl-C)",
    )


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
        "--brokers",
        help="comma-separated sources, e.g. ibkr or ibkr:alice,tastytrade "
        "(default: every configured source)",
    )
    run.set_defaults(handler=_cmd_run)

    demo = commands.add_parser(
        "demo",
        help="simulated brokers + embedded database + service",
        description="Run the whole service against simulated brokers.",
    )
    _add_duration(demo)
    demo.add_argument(
        "--status-every", type=float, default=5.0, help="seconds between status lines"
    )
    demo.set_defaults(handler=_cmd_demo)

    record = commands.add_parser(
        "record",
        help="record every raw broker frame into a fixture",
        description="Run the broker streams (no database) and write every frame they "
        "receive, with receive times and subscribed positions, to a JSON-lines fixture "
        "(.jsonl or .jsonl.gz). Secrets are never written.",
    )
    record.add_argument("--out", required=True, help="fixture file (.jsonl or .jsonl.gz)")
    record.add_argument(
        "--brokers",
        help="comma-separated sources, e.g. ibkr or ibkr:alice (default: every configured source)",
    )
    _add_duration(record)
    record.set_defaults(handler=_cmd_record)

    replay = commands.add_parser(
        "replay",
        help="feed a recorded fixture through the live code path into the database",
        description="Replay a fixture through the same protocol parsers, normalization "
        "and writer as live data; the same fixture always stores the same rows.",
    )
    replay.add_argument("fixture", help="fixture file written by `greeksd record`")
    replay.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="0 = as fast as possible (default), 1 = recorded pacing, 2 = twice as fast",
    )
    replay.add_argument(
        "--database-url",
        help="replay into this database (default: GREEKSD_DATABASE_URL, else embedded)",
    )
    replay.add_argument(
        "--processes",
        type=int,
        default=0,
        help="at full speed, replay the sources in up to this many processes at once "
        "(default 0: one per CPU, at most one per source; 1: this process only)",
    )
    replay.set_defaults(handler=_cmd_replay)

    archive = commands.add_parser("archive", help="read the raw-frame archive")
    archive_commands = archive.add_subparsers(dest="archive_command", required=True)
    frames = archive_commands.add_parser(
        "frames",
        help="the raw frames that produced a stored row",
        description="Replay the source's archived frames around --at through its protocol "
        "code and print, one JSON line each, the frames that yielded a row for the contract "
        "(the connection's link record as context); `exact` marks the frame received at "
        "--at, the row's received_at. Exit 1 when no frame received at --at did.",
    )
    frames.add_argument("--source", required=True, help="the row's source, e.g. ibkr:alice")
    frames.add_argument("--contract", required=True, help="the row's contract_key")
    frames.add_argument(
        "--at", required=True, help="the row's received_at (ISO 8601; UTC if naive)"
    )
    frames.add_argument(
        "--window-s",
        type=float,
        default=5.0,
        help="also print the contract's frames received this many seconds around --at",
    )
    frames.add_argument(
        "--archive-dir", help="the archive to read (default: $GREEKSD_DATA_DIR/archive)"
    )
    frames.set_defaults(handler=_cmd_archive_frames)

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
    sims = sim.add_subparsers(dest="broker", required=True, metavar="BROKER")
    for spec in registry.specs():
        if spec.sim is not None:
            one = sims.add_parser(spec.name, help=spec.sim.help, description=spec.sim.help)
            spec.sim.add_arguments(one)
            one.set_defaults(handler=_cmd_sim, sim=spec.sim)

    probe = commands.add_parser(
        "probe",
        help="check a broker connection and Greek coverage",
        description="Connect, subscribe the option positions for a "
        "bounded time, write a JSON summary and a per-contract coverage "
        "CSV; exit 1 when no Greeks arrived.",
    )
    probable = ", ".join(spec.name for spec in registry.specs() if spec.probe is not None)
    probe.add_argument(
        "source",
        metavar="SOURCE",
        type=_probe_target,
        help=f"a broker's default source ({probable}) or a named one from the settings "
        "file, e.g. ibkr:alice",
    )
    probe.add_argument("--duration", type=float, default=30.0, help="seconds to listen")
    probe.add_argument("--out", default="probe-results", help="directory for the reports")
    probe.set_defaults(handler=_cmd_probe)

    commands.add_parser(
        "config",
        help="show the settings in effect and the sources, secrets masked",
        description="Print every setting as greeksd reads it (environment, .env, settings "
        "file, defaults) and each source `greeksd run` would start; secrets are masked.",
    ).set_defaults(handler=_cmd_config)

    bench = commands.add_parser("bench", help="run the benchmarks, print tables, write JSON")
    bench.add_argument(
        "--database-url",
        help="benchmark against this server (default: a temporary embedded PostgreSQL)",
    )
    bench.add_argument("--out", default="bench-results/latest.json", help="JSON output path")
    bench.add_argument("--quick", action="store_true", help="small sizes and short runs")
    bench.add_argument(
        "--scale",
        action="store_true",
        help="only the scale-out case: three `greeksd run` instances into one new database",
    )
    bench.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; default: all)",
    )
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
    for warning in settings.warnings:
        log.warning("settings_warning", warning=warning)
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
