"""Baselines for the pipeline, on the same rows in the same run.

(a) the seed's original design: `executemany` INSERT, 50-row batches, a commit each;
(b) the raw limit: one bare binary COPY of the rows, no pipeline around it.
Both start from ready rows (tuples from `snapshot_row` for INSERT, the writer's own
`encode_row` bytes for COPY), so they time only the database path; the pipeline has to
do everything else on top, encoding included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from greeksd.bench.pipeline import truncate
from greeksd.model import Snapshot
from greeksd.recording import read_fixture
from greeksd.replay import Replayers, ReplayStats
from greeksd.store.columns import COPY_COLUMNS, encode_row, snapshot_row
from greeksd.store.snapshot_table import COPY_CHUNK_ROWS, COPY_DIRECT, copy_rows

INSERT = (
    f"INSERT INTO greek_snapshots ({', '.join(COPY_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(COPY_COLUMNS))})"
)


def decode_fixture(path: Path) -> list[Snapshot]:
    """Every row a fixture yields, through the replayers but without a database."""
    _, records = read_fixture(path)
    replayers, stats = Replayers(), ReplayStats()
    return [row for record in records for row in replayers.apply(record, stats)]


def executemany_insert(url: str, snapshots: list[Snapshot], batch: int = 50) -> float:
    rows = [snapshot_row(s) for s in snapshots]
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rows), batch):
                cur.executemany(INSERT, rows[i : i + batch])
                conn.commit()
        return time.perf_counter() - started


def bare_copy(url: str, snapshots: list[Snapshot]) -> float:
    rows = [encode_row(s) for s in snapshots]
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur:
            chunks = range(0, len(rows), COPY_CHUNK_ROWS)  # joined as the writer's are
            copy_rows(cur, COPY_DIRECT, (b"".join(rows[i : i + COPY_CHUNK_ROWS]) for i in chunks))
        conn.commit()
        return time.perf_counter() - started


def run(url: str, path: Path, insert_rows: int) -> list[dict[str, Any]]:
    """`insert_rows`: how many rows (a) inserts (it is slow; its rate is what counts)."""
    rows = decode_fixture(path)
    results = []
    for name, subset, load in (
        ("(a) executemany INSERT, 50-row batches", rows[:insert_rows], executemany_insert),
        ("(b) bare binary COPY (limit)", rows, bare_copy),
    ):
        truncate(url)
        seconds = load(url, subset)
        results.append(
            {
                "baseline": name,
                "rows": len(subset),
                "seconds": round(seconds, 3),
                "rows_per_s": round(len(subset) / seconds),
            }
        )
    return results
