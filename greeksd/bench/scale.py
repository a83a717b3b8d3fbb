"""Several instances, one database: two IBKR gateways and one Tastytrade login, each
simulated with an account of its own and collected by a greeksd instance of its own,
all writing into one PostgreSQL database that none of them has migrated yet.

`greeksd bench --scale` runs each instance as a real `greeksd run` process (its own
GIL, as on separate machines), started together, and offers the soak's rate (50 ticks/s
per source) for the duration. Then: ticks sent = rows stored, per source (broker +
account), nothing lost or doubled; write latency (persisted_at - send time, as each
simulator knows it) per source. The multi-instance test uses the same fleet with the
instances in-process (tests/test_multi_instance.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg import sql

from greeksd.bench.e2e import offer, percentile
from greeksd.brokers import registry
from greeksd.brokers.spec import BenchSim
from greeksd.settings_table import read_table, table_env
from greeksd.sim.market import SimContract, default_contracts
from greeksd.sim.readiness import wait_subscribed


@dataclass(frozen=True)
class Member:
    """One instance of the fleet: its name, the broker it collects, the sim's account."""

    name: str
    broker: str
    account: str


FLEET = (
    Member("ibkr-alice", "ibkr", "U1000001"),
    Member("ibkr-bob", "ibkr", "U1000002"),
    Member("tastytrade-main", "tastytrade", "5WT00009"),
)
CONTRACTS = 100  # per source: IBKR's default market-data lines (GREEKSD_IBKR_MAX_LINES)
TICKS_PER_S = 50  # per source, as in the soak (tests/test_soak.py)
SETTLE_S = 30.0


@asynccontextmanager
async def open_fleet(
    book: Sequence[SimContract], members: Sequence[Member] = FLEET
) -> AsyncIterator[dict[Member, BenchSim[Any]]]:
    """One simulator per member, silent until offered ticks, for the block."""
    async with AsyncExitStack() as stack:
        sims: dict[Member, BenchSim[Any]] = {}
        for member in members:
            spec = registry.SPECS[member.broker]
            assert spec.bench is not None, f"{member.broker} has no benchmark simulator"
            defaults = read_table(spec.settings, {}, spec.prefix)
            sim = await stack.enter_async_context(spec.bench.e2e(book, defaults))
            sim.use_account(member.account)
            sims[member] = sim
        yield sims


def instance_env(member: Member, sim: BenchSim[Any], db_url: str, data_dir: Path) -> dict[str, str]:
    """The GREEKSD_* environment of `member`'s instance: its own broker, simulator and
    data directory; the shared database; an API port of its own."""
    spec = registry.SPECS[member.broker]
    return {
        "GREEKSD_DATABASE_URL": db_url,
        "GREEKSD_DATA_DIR": str(data_dir),
        "GREEKSD_BROKERS": member.broker,
        "GREEKSD_API_PORT": "0",
        **table_env(sim.settings, spec.prefix),
    }


def stored(url: str) -> dict[tuple[str, str], int]:
    """Rows per (broker, account)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT broker, account_id, count(*) FROM greek_snapshots GROUP BY 1, 2"
        ).fetchall()
    return {(broker, account): int(count) for broker, account, count in rows}


def sent(sims: Mapping[Member, BenchSim[Any]]) -> dict[tuple[str, str], int]:
    """Ticks sent per (broker, account)."""
    return {(m.broker, m.account): sim.sent() for m, sim in sims.items()}


def latencies(url: str, sims: Mapping[Member, BenchSim[Any]]) -> dict[Member, list[float]]:
    """Each stored row's write latency (ms), per member, sorted."""
    by_account = {(m.broker, m.account): m for m in sims}
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT broker, account_id, contract_key,"
            " (extract(epoch FROM event_time) * 1000)::bigint,"
            " extract(epoch FROM persisted_at)::float8 FROM greek_snapshots"
        ).fetchall()
    out: dict[Member, list[float]] = {m: [] for m in sims}
    for broker, account, key, event_ms, persisted in rows:
        member = by_account.get((broker, account))
        if member is not None:
            latency = sims[member].latency_ms(key, event_ms, persisted)
            if latency is not None:
                out[member].append(latency)
    return {m: sorted(values) for m, values in out.items()}


async def _settle(url: str, expected: dict[tuple[str, str], int]) -> None:
    """Until every source's rows are stored, or SETTLE_S passed."""
    with trio.move_on_after(SETTLE_S):
        # rows in another process's database, no event to wait on: poll it
        while await trio.to_thread.run_sync(stored, url) != expected:  # noqa: ASYNC110
            await trio.sleep(0.2)


async def measure(url: str, duration_s: float, work_dir: Path) -> dict[str, Any]:
    """The fleet as `greeksd run` processes on `url` (brand new) for `duration_s`."""
    book = default_contracts(datetime.now(UTC).date(), CONTRACTS)
    logs: dict[Member, Path] = {}
    async with open_fleet(book) as sims, trio.open_nursery() as nursery:
        processes: dict[Member, trio.Process] = {}
        for member, sim in sims.items():
            data_dir = work_dir / member.name
            data_dir.mkdir(parents=True)
            logs[member] = data_dir / "greeksd.log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("GREEKSD_")}
            env |= instance_env(member, sim, url, data_dir)
            with logs[member].open("wb") as log_file:
                processes[member] = await nursery.start(
                    process_task([sys.executable, "-m", "greeksd.cli", "run"], env, log_file)
                )
        try:
            with trio.fail_after(60.0):
                await wait_subscribed(list(sims.values()), [c.key for c in book])
            by_name = {m.name: sim for m, sim in sims.items()}
            elapsed = await offer(by_name, TICKS_PER_S * len(sims), duration_s)
            expected = sent(sims)
            await _settle(url, expected)
        finally:
            for process in processes.values():
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
        with trio.fail_after(60.0):  # a clean stop drains and exits 0 within seconds
            codes = {m.name: await processes[m].wait() for m in sims}
        rows = await trio.to_thread.run_sync(stored, url)
        lat = await trio.to_thread.run_sync(latencies, url, sims)
        dropped = {m.name: sim.dropped() for m, sim in sims.items()}
    result: dict[str, Any] = {"seconds": round(elapsed, 1), "sources": []}
    for member in sims:
        account = (member.broker, member.account)
        values = lat[member]
        result["sources"].append(
            {
                "instance": member.name,
                "source": f"{member.broker}/{member.account}",
                "sent": expected[account],
                "stored": rows.get(account, 0),
                "lost": max(0, expected[account] - rows.get(account, 0)),
                "doubled": max(0, rows.get(account, 0) - expected[account]),
                "sim_dropped": dropped[member.name],
                "per_s": round(expected[account] / elapsed, 1),
                **{
                    name: _round(percentile(values, q))
                    for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms"))
                },
                "max_ms": _round(values[-1] if values else None),
                "exit": codes[member.name],
            }
        )
    result["unknown_rows"] = sum(rows.values()) - sum(rows.get(a, 0) for a in expected)
    result["logs_tail"] = {
        m.name: logs[m].read_text(errors="replace")[-1500:] for m in sims if codes[m.name] != 0
    }
    return result


def process_task(command: list[str], env: dict[str, str], log_file: Any) -> Any:
    """A nursery.start target running `command` (stdout and stderr to `log_file`)."""

    async def run(task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED) -> None:
        process = await trio.lowlevel.open_process(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
        task_status.started(process)
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()

    return run


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@contextmanager
def brand_new_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of `server_url`, dropped afterwards."""
    name = f"greeksd_scale_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def run(server_url: str, duration_s: float) -> list[dict[str, Any]]:
    """One run on a brand-new database of the server at `server_url`."""
    with (
        tempfile.TemporaryDirectory(prefix="greeksd-scale-") as tmp,
        brand_new_database(server_url) as url,
    ):
        result = trio.run(measure, url, duration_s, Path(tmp))
    rows: list[dict[str, Any]] = result["sources"]
    for name, tail in result["logs_tail"].items():
        print(f"instance {name} exited non-zero; log tail:\n{tail}")
    if result["unknown_rows"]:
        print(f"rows of no simulated source: {result['unknown_rows']}")
    return rows
