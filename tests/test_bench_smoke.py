"""The benchmark harness runs end to end at tiny sizes and returns well-formed results
(speed is the benchmark's business, not the tests')."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from greeksd.bench import (
    QUICK,
    baselines,
    dxlink_decode,
    e2e,
    pipeline,
    ratios,
    run_all,
    scale,
    storage,
)


def test_pipeline_and_baselines_store_every_row(db_url: str, tmp_path: Path) -> None:
    fixtures = pipeline.write_fixtures(tmp_path, 300)
    rows = pipeline.run(db_url, fixtures)
    assert [r["case"] for r in rows] == ["ibkr", "tastytrade", "mixed", pipeline.ONE_PROCESS]
    assert [r["written"] for r in rows] == [300, 300, 600, 600]
    assert all(r["snapshots_per_s"] > 0 for r in rows)
    loads = baselines.run(db_url, fixtures["mixed"], insert_rows=100)
    assert [r["rows"] for r in loads] == [100, 600]
    summary = ratios(rows, loads)
    assert summary["vs_executemany_x"] > 0 and summary["vs_bare_copy_pct"] > 0


def test_storage_measures_bytes_per_row_as_json(db_url: str, tmp_path: Path) -> None:
    """Bytes per row with and without the payload, then as written before compaction, in
    the JSON `greeksd bench --out` writes (PostgreSQL's sums are numeric: they must arrive
    as plain numbers)."""
    fixtures = pipeline.write_fixtures(tmp_path, 3000)
    rows = json.loads(json.dumps(storage.run(db_url, fixtures["mixed"])))
    assert [r["rows"] for r in rows] == [6000, 6000, 6000]
    stored, lean, live = rows
    assert lean["total_b"] < stored["total_b"] and lean["heap_b"] < stored["heap_b"]
    # the replay compacted its partition's indexes (the heap is the same rows, give or
    # take the few empty pages COPY extends a file by ahead of need)
    assert live["indexes_b"] > lean["indexes_b"]


def test_only_runs_the_named_sections(db_url: str, tmp_path: Path) -> None:
    """`greeksd bench --only decode`: that section's table, and no other (no fixtures
    written, nothing stored)."""
    results = run_all(db_url, tmp_path, replace(QUICK, decode_events=200), frozenset({"decode"}))
    assert set(results) == {"sizes", "dxlink_decode"}
    assert list(tmp_path.iterdir()) == []


def test_dxlink_decoders_agree_on_event_count() -> None:
    rows = dxlink_decode.run(200, repeats=1)
    assert [r["events"] for r in rows] == [200] * 5
    assert rows[0]["speedup_vs_sdk"] == 1.0


async def test_e2e_loses_nothing_at_a_low_rate(db_url: str) -> None:
    result = await e2e.measure(db_url, 100, 1.0, flush_rows=1000, flush_ms=100)
    assert result["sent"] > 0
    assert result["lost"] == 0
    assert result["p50_ms"] is not None and result["p50_ms"] <= result["max_ms"]
    assert result["peak_rss_mb"] > 0


def test_scale_case_stores_every_source_s_ticks_once(server_url: str) -> None:
    """`bench --scale`, short: three `greeksd run` processes on one new database."""
    rows = scale.run(server_url, 2.0)
    assert [r["instance"] for r in rows] == [m.name for m in scale.FLEET]
    for row in rows:
        assert row["sent"] > 0 and row["stored"] == row["sent"], row
        assert row["lost"] == row["doubled"] == 0 and row["exit"] == 0, row
        assert row["p50_ms"] is not None and row["p50_ms"] <= row["max_ms"]
