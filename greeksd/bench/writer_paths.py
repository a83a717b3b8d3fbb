"""Benchmark: the two ways to drive psycopg from trio, on the writer's exact SQL.

(a) psycopg's sync API in a worker thread (trio.to_thread): the Writer itself;
(b) psycopg's asyncio API through trio-asyncio: the same binary COPY into the table.
Same batches, same database, same run, so the ratio holds on a noisy machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import psycopg.waiting
import trio

from greeksd.model import Broker, Contract, ContractKey, OptionRight, Snapshot
from greeksd.store.columns import COPY_SIGNATURE, COPY_TRAILER, encode_row
from greeksd.store.snapshot_table import COPY_DIRECT
from greeksd.store.writer import Writer


def synthetic_rows(count: int, offset: int) -> list[Snapshot]:
    base = datetime.now(UTC)
    out = []
    for i in range(count):
        key = ContractKey("AAPL", date(2026, 12, 18), OptionRight.CALL, Decimal(150 + i % 40))
        contract = Contract(key, "AAPL", Decimal(100), Decimal(1), "BENCH")
        out.append(
            Snapshot.for_contract(
                Broker.SYNTHETIC,
                contract,
                event_time=base + timedelta(microseconds=offset + i),
                received_at=base,
                delta=0.5,
                gamma=0.02,
                theta=-0.1,
                vega=0.2,
                rho=0.01,
                implied_volatility=0.3,
                underlying_price=190.0,
                bid=1.0,
                ask=1.1,
                mark=1.05,
            )
        )
    return out


async def _thread_path(url: str, batches: list[list[Snapshot]]) -> None:
    writer = Writer(url)
    for batch in batches:
        await writer.write_batch(batch)


async def _trio_asyncio_path(url: str, batches: list[list[Snapshot]]) -> None:
    # Imported here: importing trio_asyncio patches asyncio process-wide, which breaks
    # any later asyncio user in the process (playwright in the test suite) when all the
    # importer wanted was `synthetic_rows`.
    import trio_asyncio

    async def write_all() -> None:
        # The writer's common case: one binary COPY straight into the table per batch
        # (greeksd/store/snapshot_table.py; staging is only for a batch with a duplicate).
        conn = await psycopg.AsyncConnection.connect(url)
        for batch in batches:
            rows = b"".join([encode_row(s) for s in batch])  # as the writer encodes
            async with conn.cursor() as cur, cur.copy(COPY_DIRECT) as copy:
                await copy.write(COPY_SIGNATURE + rows + COPY_TRAILER)
            await conn.commit()
        await conn.close()

    # psycopg binds asyncio.get_running_loop at import time; trio-asyncio patches the
    # asyncio attribute, so hand psycopg the patched one (bench-only concern).
    psycopg.waiting.get_running_loop = asyncio.get_running_loop  # type: ignore[attr-defined]
    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(write_all)()


def _truncate(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE greek_snapshots")


async def measure(url: str, batch_rows: int, total: int) -> list[dict[str, Any]]:
    results = []
    paths: list[tuple[str, Callable[[str, list[list[Snapshot]]], Awaitable[None]]]] = [
        ("sync psycopg in trio worker thread", _thread_path),
        ("async psycopg via trio-asyncio", _trio_asyncio_path),
    ]
    for name, path in paths:
        batches = [
            synthetic_rows(batch_rows, offset=i * batch_rows) for i in range(total // batch_rows)
        ]
        _truncate(url)
        started = time.perf_counter()
        await path(url, batches)
        elapsed = time.perf_counter() - started
        results.append(
            {
                "path": name,
                "batch_rows": batch_rows,
                "rows": total,
                "seconds": round(elapsed, 3),
                "rows_per_s": round(total / elapsed),
            }
        )
    return results


def run(url: str, total: int = 20_000) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for batch_rows in (50, 1000):
        results.extend(trio.run(measure, url, batch_rows, total))
    return results
