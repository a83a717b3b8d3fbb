"""The report both broker probes write: a JSON summary and a per-contract coverage CSV.

One writer so the two probes' files stay the same shape and a script can read either.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from greeksd.logs import get_logger

log = get_logger("greeksd.probe")

COVERAGE: tuple[str, ...] = ("delta", "gamma", "theta", "vega", "implied_volatility")


def contracts_covered(rows: Sequence[dict[str, Any]]) -> int:
    """Contracts for which at least one Greek arrived."""
    return sum(1 for row in rows if any(row[name] for name in COVERAGE))


def finish_report(
    out_dir: Path,
    broker: str,
    summary: dict[str, Any],
    hints: list[str],
    rows: Sequence[dict[str, Any]],
    id_columns: Sequence[str],
) -> int:
    """Write `<broker>-probe.json` and `<broker>-probe-coverage.csv`, log the hints,
    and return the exit code: 1 when no contract got any Greek."""
    summary["hints"] = hints
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{broker}-probe.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with (out_dir / f"{broker}-probe-coverage.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*id_columns, *COVERAGE, "first_greeks_ms"])
        writer.writeheader()
        writer.writerows(rows)
    for hint in hints:
        log.warning("probe_hint", broker=broker, hint=hint)
    return 0 if contracts_covered(rows) else 1
