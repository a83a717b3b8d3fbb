"""Benchmark: bytes on disk per `greek_snapshots` row, as the issue's check measures it.

The mixed fixture is replayed with `greeksd replay`'s defaults (which compact the
partitions it loaded: greeksd.store.compaction) once with each GREEKSD_STORE_PAYLOAD value
into an empty table, then every leaf partition's total relation size (heap, TOAST,
indexes) is summed and divided by the rows: what the issue's check (replay a large
fixture, pg_total_relation_size / rows) sees. One more replay without the compaction
shows a day's partition while the live streams still write it (its contract index half
full until the keeper compacts it an hour after the day ends). The heap and each index
are shown apart, so a change to either shows where the bytes went.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import trio

from greeksd.bench.pipeline import FLUSH_ROWS, truncate
from greeksd.replay import replay_fixture

TARGET_BYTES = 350

_SIZES = """
SELECT sum(pg_total_relation_size(relid))::bigint, sum(pg_relation_size(relid))::bigint,
       sum(pg_indexes_size(relid))::bigint
FROM pg_partition_tree('greek_snapshots') WHERE isleaf"""
# Each of the parent's indexes, summed over its partitions' indexes.
_BY_INDEX = """
SELECT parent.relname, sum(pg_relation_size(leaf.relid))::bigint
FROM pg_partition_tree('greek_snapshots_time_idx') leaf
JOIN pg_class parent ON parent.oid = 'greek_snapshots_time_idx'::regclass
WHERE leaf.isleaf GROUP BY 1
UNION ALL
SELECT parent.relname, sum(pg_relation_size(leaf.relid))::bigint
FROM pg_partition_tree('greek_snapshots_contract_idx') leaf
JOIN pg_class parent ON parent.oid = 'greek_snapshots_contract_idx'::regclass
WHERE leaf.isleaf GROUP BY 1"""


def measure(url: str) -> dict[str, Any]:
    """Bytes per row of what `greek_snapshots` holds now."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM greek_snapshots").fetchone()
        total, heap, indexes = conn.execute(_SIZES).fetchone() or (0, 0, 0)
        by_index = conn.execute(_BY_INDEX).fetchall()
    count = rows[0] if rows else 0
    per_row = {"rows": count, "total_b": round(total / count, 1), "heap_b": round(heap / count, 1)}
    per_row["indexes_b"] = round(indexes / count, 1)
    per_row |= {f"{name}_b": round(size / count, 1) for name, size in by_index}
    return per_row


def run(url: str, fixture: Path) -> list[dict[str, Any]]:
    results = []
    for store_payload, compact in ((True, True), (False, True), (False, False)):
        truncate(url)
        trio.run(
            partial(
                replay_fixture,
                url,
                fixture,
                flush_rows=FLUSH_ROWS,
                store_payload=store_payload,
                compact=compact,
            )
        )
        sizes = measure(url)
        results.append(
            {
                "source_payload": "stored" if store_payload else "off (default)",
                "indexes": "replayed (compacted)" if compact else "live day (as written)",
                **sizes,
                "target_b": TARGET_BYTES,
                "met": sizes["total_b"] <= TARGET_BYTES,
            }
        )
    return results
