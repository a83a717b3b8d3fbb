"""`greeksd bench`: benchmarks that print a table and write JSON.

Every comparison runs in the same process run on the same machine, against the same
database, so the ratios hold on a noisy box even when the absolute numbers do not.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from greeksd.logs import configure_logging
from greeksd.store.database import embedded_postgres
from greeksd.store.migrations import migrate


@dataclass(frozen=True)
class Sizes:
    per_broker: int  # snapshots per broker in the pipeline fixtures
    insert_rows: int  # rows baseline (a) inserts
    decode_events: int
    e2e_rates: tuple[float, ...]
    e2e_flush_compare: tuple[float, ...]
    e2e_duration_s: float
    writer_rows: int
    api_reads_s: float  # each phase of the API-reads-vs-writer case
    scale_s: float  # the scale-out case (--scale)


FULL = Sizes(
    100_000, 20_000, 100_000, (50, 500, 5_000, 20_000), (500, 5_000), 10.0, 20_000, 10.0, 60.0
)
QUICK = Sizes(10_000, 2_000, 10_000, (50, 500), (500,), 2.0, 2_000, 3.0, 5.0)


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = [c for c in rows[0] if not isinstance(rows[0][c], dict)]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


SECTIONS = ("pipeline", "baselines", "storage", "decode", "e2e", "writer", "api")
"""What `--only` may name; every one by default."""


def run_benchmarks(
    database_url: str | None,
    out: Path,
    *,
    quick: bool = False,
    scale: bool = False,
    only: Sequence[str] = SECTIONS,
) -> int:
    sizes = QUICK if quick else FULL
    suite = run_scale if scale else partial(run_all, only=frozenset(only))
    configure_logging("ERROR")  # the tables are the output; errors still show
    logging.getLogger("hypercorn.error").setLevel(logging.ERROR)  # the simulators' servers
    with tempfile.TemporaryDirectory(prefix="greeksd-bench-") as tmp:
        if database_url:
            results = suite(database_url, Path(tmp), sizes)
        else:
            with embedded_postgres(Path(tmp) / "pg") as server:
                results = suite(server.url, Path(tmp), sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


def run_all(
    url: str, tmp: Path, sizes: Sizes, only: frozenset[str] = frozenset(SECTIONS)
) -> dict[str, Any]:
    """The sections named in `only` (a profile or an A/B comparison of one section need
    not wait for the others), in the order of the README's tables."""
    from greeksd.bench import (
        api_reads,
        baselines,
        dxlink_decode,
        e2e,
        pipeline,
        storage,
        writer_paths,
    )

    migrate(url)
    results: dict[str, Any] = {"sizes": sizes.__dict__}
    needs_fixtures = only & {"pipeline", "baselines", "storage"}
    fixtures = pipeline.write_fixtures(tmp, sizes.per_broker) if needs_fixtures else {}

    if "pipeline" in only:
        print("== 1. pipeline: fixture frames => decode => normalize => writer => COPY")
        results["pipeline"] = pipeline.run(url, fixtures)
        print_table(results["pipeline"])

    if "baselines" in only:
        print("\n== 2. baselines on the mixed fixture's rows (same rows, same database)")
        results["baselines"] = baselines.run(url, fixtures["mixed"], sizes.insert_rows)
        print_table(results["baselines"])
        if "pipeline" in results:
            results["ratios"] = ratios(results["pipeline"], results["baselines"])
            print_table([results["ratios"]])

    if "storage" in only:
        print("\n== 2b. storage: bytes on disk per row (heap + TOAST + indexes), mixed fixture")
        results["storage"] = storage.run(url, fixtures["mixed"])
        print_table(results["storage"])

    if "decode" in only:
        print("\n== 2c. DXLink FEED_DATA decoding, same frames (10 Greeks events each)")
        results["dxlink_decode"] = dxlink_decode.run(sizes.decode_events)
        print_table(results["dxlink_decode"])

    if "e2e" in only:
        print("\n== 3/4. end to end: sim socket => streams (other process) => commit")
        print("   latency = persisted_at - send time; IBKR ms resolution; rate split over brokers")
        results["e2e"] = e2e.run(
            url, list(sizes.e2e_rates), sizes.e2e_duration_s, list(sizes.e2e_flush_compare)
        )
        print_table(results["e2e"])

    if "writer" in only:
        print("\n== writer: psycopg driven from trio (rows/s)")
        results["writer_paths"] = writer_paths.run(url, sizes.writer_rows)
        print_table(results["writer_paths"])

    if "api" in only:
        print(f"\n== 5. API reads vs the writer: {api_reads.RATE} rows/s in; no readers, then")
        print(
            f"   {api_reads.CONCURRENCY} polite, then {api_reads.CONCURRENCY} hammering connections"
        )
        print("   writer latency = persisted_at - received_at; target p99 within 2x of quiet")
        results["api_reads"] = api_reads.run(url, sizes.api_reads_s)
        print_table(results["api_reads"])
    return results


def run_scale(url: str, tmp: Path, sizes: Sizes) -> dict[str, Any]:
    from greeksd.bench import scale

    print(f"== scale out: {len(scale.FLEET)} `greeksd run` instances (two IBKR gateways, one")
    print("   Tastytrade login), started together on one brand-new database;")
    print(f"   {scale.TICKS_PER_S} ticks/s per source, {scale.CONTRACTS} contracts each, for")
    print(f"   {sizes.scale_s:g} s; latency = persisted_at - send time")
    rows = scale.run(url, sizes.scale_s)
    print_table(rows)
    return {"sizes": sizes.__dict__, "scale": rows}


def ratios(
    pipeline_rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    mixed = next(r["snapshots_per_s"] for r in pipeline_rows if r["case"] == "mixed")
    insert, copy = (r["rows_per_s"] for r in baseline_rows)
    return {
        "mixed_pipeline_per_s": mixed,
        "vs_executemany_x": round(mixed / insert, 1),
        "vs_bare_copy_pct": round(100 * mixed / copy, 1),
    }
