"""`GET /metrics`: the status counters in Prometheus text format (version 0.0.4)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

from quart import Blueprint, Response

from greeksd.api.state import ServiceState, current_state
from greeksd.archive import STATES as ARCHIVE_STATES
from greeksd.archive import ArchiveStats
from greeksd.coverage import STATES
from greeksd.latency import PROMETHEUS_BOUNDS_S
from greeksd.model import StreamState
from greeksd.store.writer_stats import SPOOL_STATES

bp = Blueprint("metrics", __name__)

Sample = tuple[dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(
            f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}"
        )
    return lines


def render(state: ServiceState) -> str:
    streams = state.supervisor.registry
    stats = state.writer.stats
    lines: list[str] = []
    per_stream = (
        ("greeksd_ticks_total", "counter", "Greeks messages received.", "ticks"),
        (
            "greeksd_rejected_frames_total",
            "counter",
            "Frames refused as malformed.",
            "rejected_frames",
        ),
        ("greeksd_reconnects_total", "counter", "Broker reconnects.", "reconnects"),
        ("greeksd_restarts_total", "counter", "Supervisor restarts after a failure.", "restarts"),
        ("greeksd_subscriptions", "gauge", "Instruments subscribed.", "subscriptions"),
    )
    for name, kind, help_text, attr in per_stream:
        lines += _family(
            name,
            kind,
            help_text,
            (({"broker": n}, float(getattr(s, attr))) for n, s in streams.items()),
        )
    lines += _family(
        "greeksd_stream_state",
        "gauge",
        "1 for the stream's current state, else 0.",
        (
            ({"broker": n, "state": st.value}, float(s.state is st))
            for n, s in streams.items()
            for st in StreamState
        ),
    )
    now = datetime.now(UTC)
    counts = {n: s.coverage.summary(now) for n, s in streams.items() if s.coverage is not None}
    lines += _family(
        "greeksd_contracts",
        "gauge",
        "Subscribed contracts by coverage state (fresh, stale, never, delayed).",
        (
            ({"broker": n, "state": st}, float(summary[st]))
            for n, summary in counts.items()
            for st in STATES
        ),
    )
    writer: tuple[tuple[str, str, str, float], ...] = (
        (
            "greeksd_rows_accepted_total",
            "counter",
            "Rows sources handed to the sink.",
            state.sink.accepted,
        ),
        ("greeksd_rows_written_total", "counter", "Rows committed.", stats.rows_written),
        ("greeksd_batches_total", "counter", "Batches committed.", stats.batches),
        (
            "greeksd_duplicates_total",
            "counter",
            "Rows already stored (exact duplicates).",
            stats.duplicates,
        ),
        (
            "greeksd_late_total",
            "counter",
            "Rows older than the newest accepted for their contract (stored).",
            stats.late,
        ),
        (
            "greeksd_conflated_total",
            "counter",
            "Rows replaced by a newer one while the channel was full.",
            state.sink.conflated,
        ),
        ("greeksd_queue_depth", "gauge", "Rows waiting for the writer.", state.sink.queue_depth),
        (
            "greeksd_writer_failed_attempts_total",
            "counter",
            "Batch writes that failed.",
            stats.failed_attempts,
        ),
        ("greeksd_spool_bytes", "gauge", "Bytes waiting in the disk spool.", stats.spool_bytes),
        (
            "greeksd_spooled_rows_total",
            "counter",
            "Rows written to the disk spool.",
            stats.spooled_rows,
        ),
        (
            "greeksd_spool_errors_total",
            "counter",
            "Spool operations the disk refused (full, read-only, I/O error).",
            stats.spool_errors,
        ),
        (
            "greeksd_spool_full_total",
            "counter",
            "Appends refused because the spool reached GREEKSD_SPOOL_MAX_MB.",
            stats.spool_full,
        ),
        (
            "greeksd_held_rows",
            "gauge",
            "Rows the writer holds in memory because neither database nor spool takes them.",
            stats.held_rows,
        ),
        (
            "greeksd_rejected_rows_total",
            "counter",
            "Spooled rows the table refused, set aside in the .rejected.jsonl file.",
            stats.rejected_rows,
        ),
    )
    if state.trade_writer is not None:
        trade_stats = state.trade_writer.stats
        writer += (
            ("greeksd_trades_written_total", "counter", "Trades stored.", trade_stats.written),
            (
                "greeksd_trades_duplicates_total",
                "counter",
                "Trades already stored (same broker trade id).",
                trade_stats.duplicates,
            ),
            (
                "greeksd_trades_dropped_total",
                "counter",
                "Trades refused because the trade channel was full.",
                state.sink.trades_dropped,
            ),
        )
    for name, kind, help_text, value in writer:
        lines += _family(name, kind, help_text, [({}, float(value))])
    lines += _family(
        "greeksd_writer_state",
        "gauge",
        "1 for the writer's current state, else 0.",
        (({"state": st.value}, float(stats.state is st)) for st in StreamState),
    )
    lines += _family(
        "greeksd_spool_state",
        "gauge",
        "1 for the disk spool's current state, else 0.",
        (({"state": st}, float(stats.spool_state == st)) for st in SPOOL_STATES),
    )
    lines += _family(
        "greeksd_conflated_by_reason_total",
        "counter",
        "Conflated rows by the reason the channel was full.",
        (({"reason": r}, float(n)) for r, n in sorted(stats.conflated_by_reason.items())),
    )
    if state.archive is not None:
        lines += _archive_families(state.archive.stats)
    compaction = state.compaction
    for name, help_text, value in (
        (
            "greeksd_partitions_compacted_total",
            "Closed daily partitions whose indexes the keeper rebuilt packed.",
            compaction.compacted,
        ),
        (
            "greeksd_partition_compaction_failures_total",
            "Partition index rebuilds that failed (retried the next hour).",
            compaction.failed,
        ),
        (
            "greeksd_partition_compaction_bytes_saved_total",
            "Index bytes the keeper's rebuilds freed.",
            compaction.bytes_saved,
        ),
    ):
        lines += _family(name, "counter", help_text, [({}, float(value))])
    latency = stats.latency
    cumulative = list(accumulate(latency.prometheus_counts))
    buckets: list[Sample] = [
        ({"le": f"{bound:g}"}, float(n))
        for bound, n in zip(PROMETHEUS_BOUNDS_S, cumulative, strict=False)
    ]
    buckets.append(({"le": "+Inf"}, float(latency.count)))
    name = "greeksd_write_latency_seconds"
    lines += [
        f"# HELP {name} persisted_at - received_at per row.",
        f"# TYPE {name} histogram",
    ]
    lines += _family(f"{name}_bucket", "histogram", "", buckets)[2:]
    lines += [f"{name}_sum {_number(latency.sum_s)}", f"{name}_count {latency.count}"]
    refusals = state.reads.refusals.total
    lines += _family(
        "greeksd_api_refused_total",
        "counter",
        "HTTP requests answered 503 because the API was saturated, by reason.",
        (({"reason": reason}, float(refusals[reason])) for reason in ("busy", "reads_busy")),
    )
    return "\n".join(lines) + "\n"


@bp.get("/metrics")
async def metrics() -> Response:
    state = current_state()
    text = await state.on_service_loop(render, state)
    return Response(text, content_type="text/plain; version=0.0.4")


PATHS: dict[str, Any] = {
    "/metrics": {
        "get": {
            "summary": "Counters and gauges in Prometheus text format.",
            "responses": {"200": {"description": "OK", "content": {"text/plain": {}}}},
        }
    }
}


def _archive_families(stats: ArchiveStats) -> list[str]:
    """The raw-frame archive (greeksd.archive): what it wrote, what it lost, its state."""
    lines: list[str] = []
    for name, help_text, value in (
        ("greeksd_archive_records_total", "Records written to the archive.", stats.records),
        ("greeksd_archive_bytes_total", "Compressed bytes written to the archive.", stats.bytes),
        (
            "greeksd_archive_dropped_total",
            "Records not archived: the disk refused them or the backlog was full.",
            stats.dropped,
        ),
        (
            "greeksd_archive_errors_total",
            "Archive disk operations refused (full, read-only, I/O error).",
            stats.errors,
        ),
    ):
        lines += _family(name, "counter", help_text, [({}, float(value))])
    lines += _family(
        "greeksd_archive_state",
        "gauge",
        "1 for the archive's current state, else 0.",
        (({"state": st}, float(stats.state == st)) for st in ARCHIVE_STATES),
    )
    return lines
