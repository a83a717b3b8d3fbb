"""The writer's status counters (`/v1/streaming/status`, `/metrics`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from greeksd.latency import LatencyHistogram
from greeksd.model import StreamState

SPOOL_STATES = ("ok", "full", "unavailable", "none")  # status `spool_state`; none: no spool


@dataclass
class WriterStats:
    state: StreamState = StreamState.CONNECTING
    last_error: str | None = None
    rows_received: int = 0
    rows_written: int = 0
    duplicates: int = 0
    late: int = 0
    batches: int = 0
    failed_attempts: int = 0
    last_batch_rows: int = 0
    last_flush_ms: float | None = None
    spool_bytes: int = 0
    spooled_rows: int = 0
    spool_full: int = 0
    spool_state: str = "none"  # one of SPOOL_STATES
    spool_error: str | None = None
    spool_errors: int = 0
    holding_reason: str | None = None
    held_rows: int = 0
    conflated_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_rows: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def as_json(self, queue_depth: int | None = None) -> dict[str, Any]:
        now_s = time.time()
        pct = self.latency.percentiles(now_s)
        return {
            "state": self.state.value,
            "last_error": self.last_error,
            "rows_received": self.rows_received,
            "rows_written": self.rows_written,
            "duplicates": self.duplicates,
            "late": self.late,
            "batches": self.batches,
            "failed_attempts": self.failed_attempts,
            "last_batch_rows": self.last_batch_rows,
            "last_flush_ms": self.last_flush_ms,
            "queue_depth": queue_depth,
            "spool_bytes": self.spool_bytes,
            "spooled_rows": self.spooled_rows,
            "spool_full": self.spool_full,
            "spool_state": self.spool_state,
            "spool_error": self.spool_error,
            "spool_errors": self.spool_errors,
            "holding_reason": self.holding_reason,
            "held_rows": self.held_rows,
            "conflated_by_reason": dict(self.conflated_by_reason),
            "rejected_rows": self.rejected_rows,
            "latency_ms": {
                "p50": pct[0.5],
                "p95": pct[0.95],
                "p99": pct[0.99],
                "max": self.latency.window_max(now_s),
            },
        }
