"""Benchmark: pipeline throughput, recorded frames => decode => normalize => writer => COPY.

A synthetic fixture per broker (and one mixed) goes through `replay_fixture` at full
speed: the same protocol modules, sink, writer and COPY as live data. `cpu_us_per_row`
is greeksd's own CPU (every thread of this process and of the replay's child processes:
reading the fixture, decoding, building rows, encoding and sending them; not
PostgreSQL's) per stored snapshot.

A replay at full speed splits the sources over processes (greeksd.replay_parts), which
only a fixture with several sources can use: the mixed case runs both ways, split (what
`greeksd replay` does) and in one process (what one process's GIL allows, the ceiling of
the live service's single process too).
"""

from __future__ import annotations

import resource
import time
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import trio

from greeksd import heap
from greeksd.bench.fixture import write_fixture
from greeksd.brokers import registry
from greeksd.replay import replay_fixture
from greeksd.replay_parts import AUTO

FLUSH_ROWS = 5000  # replay batches (the writer measured ~90k rows/s alone at 5,000)


ONE_PROCESS = "mixed, one process"


def cases() -> dict[str, list[str]]:
    """One fixture per broker with a benchmark entry, and one mixing them all."""
    benched = [spec.name for spec in registry.specs() if spec.bench is not None]
    return {**{name: [name] for name in benched}, "mixed": benched}


def _cpu_s() -> float:
    """CPU of this process and of its children that have ended (the replay's parts)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def truncate(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE greek_snapshots")


def write_fixtures(directory: Path, per_broker: int) -> dict[str, Path]:
    return {
        name: write_fixture(directory / f"{name}.jsonl", brokers, per_broker)
        for name, brokers in cases().items()
    }


def run(url: str, fixtures: dict[str, Path]) -> list[dict[str, Any]]:
    heap.settle()  # as `greeksd replay` does before replaying
    results = []
    runs = [(name, path, AUTO) for name, path in fixtures.items()]
    runs.append((ONE_PROCESS, fixtures["mixed"], 1))
    for name, path, processes in runs:
        truncate(url)
        cpu = _cpu_s()
        stats = trio.run(
            partial(replay_fixture, url, path, flush_rows=FLUSH_ROWS, processes=processes)
        )
        cpu = _cpu_s() - cpu
        results.append(
            {
                "case": name,
                "snapshots": stats.snapshots,
                "written": stats.rows_written,
                "seconds": round(stats.wall_s, 3),
                "snapshots_per_s": round(stats.snapshots / stats.wall_s),
                "cpu_us_per_row": round(cpu / max(stats.rows_written, 1) * 1e6, 1),
            }
        )
    return results
