"""`greeksd bench`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from greeksd.store.database import embedded_postgres
from greeksd.store.migrations import migrate


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def run_benchmarks(database_url: str | None, out: Path) -> int:
    from greeksd.bench import writer_paths

    with tempfile.TemporaryDirectory(prefix="greeksd-bench-") as tmp:
        if database_url:
            url = database_url
            results = _run_all(writer_paths, url)
        else:
            with embedded_postgres(Path(tmp)) as server:
                results = _run_all(writer_paths, server.url)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


def _run_all(writer_paths: Any, url: str) -> dict[str, Any]:
    migrate(url)
    print("== writer: psycopg driven from trio (rows/s, higher is better)")
    rows = writer_paths.run(url)
    print_table(rows)
    return {"writer_paths": rows}
