"""The running service: database, pipeline, supervisor, partition keeper, HTTP, signals.

    trio.run
    └── signal watcher + service scope
        └── raw-frame archive (worker thread)       ← closed last: writes the last frames
          └── pipeline (writer + overflow pump)     ← closed after the streams, so it drains
            └── inner nursery: supervisor (one scope per broker), partition keeper, HTTP

HTTP is a task that owns a thread running its own trio loop (greeksd.api.loop), so
requests never queue in the writer's loop; cancelling the task stops and joins it.

The database may be down (or hang) at start: migrations and partitions are then retried
in the background (`keep_database`) while the streams run and the writer spools, and the
writer only sends rows once the schema is in place.

The first SIGINT/SIGTERM cancels the inner nursery (stop reading), then the pipeline
drains and commits everything accepted, then the embedded database stops; exit 0. A
second signal exits at once and says how many accepted rows were not written.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import psycopg
import trio
from hypercorn.config import Config as HypercornConfig

from greeksd.api.app import create_app
from greeksd.api.loop import serve_in_own_loop
from greeksd.api.state import ServiceState, open_read_pool
from greeksd.archive import Archive, open_archive, with_recorder
from greeksd.backoff import Backoff
from greeksd.brokers.link import BrokerStream
from greeksd.config import Settings
from greeksd.logs import get_logger
from greeksd.model import Source, keeping_payload
from greeksd.pipeline import open_pipeline
from greeksd.redact import register_secret
from greeksd.settings_table import ConfigError
from greeksd.store.compaction import CompactionStats, compact_closed
from greeksd.store.database import embedded_postgres
from greeksd.store.deadline import CLIENT_GRACE_S, Watch, call_bounded, with_timeouts
from greeksd.store.migrations import MigrationError, migrate
from greeksd.store.partitions import drop_expired, ensure_partitions
from greeksd.store.spool import Spool
from greeksd.store.writer import Writer
from greeksd.supervisor import Supervisor

log = get_logger("greeksd.service")

EXIT_SECOND_SIGNAL = 130


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_exposure(settings: Settings) -> None:
    """A non-loopback API without a token would hand control to the whole network."""
    if not is_loopback(settings.api_host) and not settings.api_token:
        raise ConfigError(
            f"GREEKSD_API_HOST={settings.api_host} is not loopback: set GREEKSD_API_TOKEN "
            "so that mutating routes require a bearer token"
        )


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The user's database, or an embedded one for the lifetime of the block."""
    if settings.database_url:
        yield settings.database_url
        return
    with embedded_postgres(settings.data_dir) as server:
        yield server.url


def _maintain_partitions_sync(
    url: str, days_ahead: int, retention_days: int, timeout_s: float, watch: Watch
) -> None:
    today = datetime.now(UTC).date()
    link = watch.open(partial(psycopg.connect, autocommit=True), url, timeout_s)
    try:
        # another instance's partition DDL is waited for half the statement timeout, so
        # a stuck one ends this round with SchemaLockBusy (naming it) well within bounds
        ensure_partitions(link.conn, today, days_ahead, timeout_s / 2)
        drop_expired(link.conn, today, retention_days, timeout_s / 2)
    finally:
        link.close()


async def maintain_partitions(
    url: str,
    days_ahead: int,
    retention_days: int,
    timeout_s: float,
    limiter: trio.CapacityLimiter,
) -> None:
    """One round of partition upkeep, bounded like the writer's calls (statement_timeout
    plus a client deadline), so a frozen database cannot hang it."""
    await call_bounded(
        partial(_maintain_partitions_sync, url, days_ahead, retention_days, timeout_s),
        timeout_s + CLIENT_GRACE_S,
        limiter,
    )


async def keep_partitions(
    url: str,
    days_ahead: int,
    retention_days: int,
    interval_s: float = 3600.0,
    *,
    timeout_s: float = 5.0,
) -> None:
    """Create tomorrow's partitions before midnight and drop expired ones, hourly."""
    limiter = trio.CapacityLimiter(1)
    while True:
        try:
            await maintain_partitions(url, days_ahead, retention_days, timeout_s, limiter)
            delay = interval_s
        except psycopg.Error as exc:
            log.error(
                "partition_maintenance_failed",
                error=f"{type(exc).__name__}: {str(exc).strip()}",
                retry_in_s=60,
            )
            delay = min(60.0, interval_s)
        await trio.sleep(delay)


def _compact_closed_sync(
    url: str, lock_wait_s: float, stats: CompactionStats, opened: list[psycopg.Connection]
) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        opened.append(conn)
        conn.execute("SET statement_timeout = 0")  # a rebuild takes what the partition needs
        compact_closed(conn, datetime.now(UTC), lock_wait_s, stats)


async def keep_compacted(
    url: str, lock_wait_s: float, stats: CompactionStats, interval_s: float = 3600.0
) -> None:
    """Compact closed partitions' indexes (greeksd.store.compaction), hourly, apart from
    `keep_partitions`: a rebuild may take minutes and must not hold up tomorrow's
    partition. Cancelled (shutdown), it cancels the rebuild on the server; what that
    leaves is dropped next round."""
    while True:
        opened: list[psycopg.Connection] = []
        try:
            await trio.to_thread.run_sync(
                partial(_compact_closed_sync, url, lock_wait_s, stats, opened),
                abandon_on_cancel=True,
            )
        except psycopg.Error as exc:  # counted and logged per partition by compact_closed
            log.error(
                "compaction_round_failed",
                error=f"{type(exc).__name__}: {str(exc).strip()}",
                retry_in_s=interval_s,
            )
        finally:
            if opened and not opened[0].closed:
                opened[0].cancel_safe(timeout=2.0)
        await trio.sleep(interval_s)


async def prepare_database(url: str, settings: Settings) -> None:
    """Migrations, then today's (and the next days') partitions. Migrations run without a
    statement timeout (one may legitimately take long); connecting is still bounded by
    the connect/TCP timeouts in `url`, and waiting for another instance's migration by
    the DB timeout (then SchemaLockBusy: started anyway, retried like an outage)."""
    await trio.to_thread.run_sync(
        partial(migrate, url, lock_wait_s=settings.db_timeout_s), abandon_on_cancel=True
    )
    await maintain_partitions(
        url,
        settings.partition_days_ahead,
        settings.retention_days,
        settings.db_timeout_s,
        trio.CapacityLimiter(1),
    )


async def keep_database(
    url: str,
    settings: Settings,
    writer: Writer,
    schema_ready: trio.Event,
    *,
    backoff: Backoff | None = None,
    compaction: CompactionStats | None = None,
) -> None:
    """Until the schema is in place, retry `prepare_database` with backoff (the writer
    spools meanwhile and the status says why); then open the writer's gate and keep
    the partitions (and, given `compaction`'s counters, compact the closed ones)."""
    backoff = backoff or Backoff(initial=0.5, maximum=30.0)
    while not schema_ready.is_set():
        try:
            await prepare_database(url, settings)
        except (psycopg.Error, MigrationError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip()}"
            writer.waiting_for_database(reason)
            delay = backoff.next_delay()
            log.error("database_not_ready", error=reason, retry_in_s=round(delay, 2))
            await trio.sleep(delay)
            continue
        log.info("database_ready", attempts=backoff.attempts + 1)
        schema_ready.set()
    async with trio.open_nursery() as nursery:
        if compaction is not None and settings.compact_partitions:
            nursery.start_soon(keep_compacted, url, settings.db_timeout_s, compaction)
        await keep_partitions(
            url,
            settings.partition_days_ahead,
            settings.retention_days,
            timeout_s=settings.db_timeout_s,
        )


@dataclass
class RunningService:
    state: ServiceState
    api_url: str
    cancel_scope: trio.CancelScope

    def stop(self) -> None:
        self.cancel_scope.cancel()


async def _serve_http(state: ServiceState, nursery: trio.Nursery) -> str:
    config = HypercornConfig()
    config.bind = [f"{state.settings.api_host}:{state.settings.api_port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    bound: str = await nursery.start(serve_in_own_loop, create_app(state), config)
    return bound


@contextlib.asynccontextmanager
async def open_service(
    settings: Settings, sources: Sequence[Source]
) -> AsyncIterator[RunningService]:
    """Start everything; leaving the block (or `stop()`) shuts down in order."""
    check_api_exposure(settings)
    for secret in settings.secrets():
        register_secret(secret)
    async with (
        archiving(settings, sources) as archive,
        _open_service(settings, sources, archive) as service,
    ):
        yield service


@contextlib.asynccontextmanager
async def archiving(settings: Settings, sources: Sequence[Source]) -> AsyncIterator[Archive | None]:
    """Unless GREEKSD_ARCHIVE=0: an archive every broker stream records to (next to a
    recorder it may already have), whose worker runs until after the streams stopped
    and the pipeline drained, so the last frames are written too."""
    if not settings.archive:
        log.info("archive_off")
        yield None
        return
    archive = Archive(
        settings.data_dir / "archive",
        retention_days=settings.archive_retention_days,
        flush_ms=settings.archive_flush_ms,
    )
    for source in sources:
        if isinstance(source, BrokerStream):
            source.recorder = with_recorder(source.recorder, archive)
    async with open_archive(archive):
        yield archive


@contextlib.asynccontextmanager
async def _open_service(
    settings: Settings, sources: Sequence[Source], archive: Archive | None
) -> AsyncIterator[RunningService]:
    with database_url(settings) as url, keeping_payload(settings.store_payload):
        bounded_url = with_timeouts(url, settings.db_timeout_s)
        schema_ready = trio.Event()
        unreachable: str | None = None
        try:
            await prepare_database(bounded_url, settings)
            schema_ready.set()
        except psycopg.OperationalError as exc:  # refused or not answering: start anyway
            unreachable = f"{type(exc).__name__}: {str(exc).strip()}"
            log.error(
                "database_unreachable_at_start",
                error=unreachable,
                consequence="streams run and rows spool; migrations retried in the background",
            )
        async with (
            open_read_pool(url) as reads,
            open_pipeline(
                url,
                flush_rows=settings.flush_rows,
                flush_ms=settings.flush_ms,
                queue_size=settings.queue_size,
                slo_ms=settings.latency_slo_ms,
                spool=Spool(
                    settings.data_dir / "spool" / "snapshots.spool",
                    settings.spool_max_mb * 1024 * 1024,
                ),
                db_timeout_s=settings.db_timeout_s,
                schema_ready=schema_ready,
                instance=settings.instance,
                store_payload=settings.store_payload,
            ) as pipeline,
        ):
            if unreachable is not None:
                pipeline.writer.waiting_for_database(unreachable)
            supervisor = Supervisor(pipeline.sink, stale_s=settings.stale_s)
            for source in sources:
                supervisor.add(source)
            state = ServiceState(
                settings,
                url,
                supervisor,
                pipeline.writer,
                pipeline.sink,
                reads,
                pipeline.trade_writer,
                service_token=trio.lowlevel.current_trio_token(),
                archive=archive,
            )
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    partial(
                        keep_database,
                        bounded_url,
                        settings,
                        pipeline.writer,
                        schema_ready,
                        compaction=state.compaction,
                    )
                )
                api_url = await _serve_http(state, inner)
                await inner.start(supervisor.run)
                log.info(
                    "service_started",
                    api=api_url,
                    sources=",".join(supervisor.names),
                    instance=settings.instance,
                    database="embedded" if not settings.database_url else "url",
                )
                yield RunningService(state, api_url, inner.cancel_scope)
                inner.cancel_scope.cancel()
            log.info("service_stopping", pending=pipeline.sink.queue_depth)
        log.info(
            "service_stopped",
            accepted=pipeline.sink.accepted,
            rows_written=pipeline.writer.stats.rows_written,
            duplicates=pipeline.writer.stats.duplicates,
        )


async def run_until_signal(
    settings: Settings,
    sources: Sequence[Source],
    *,
    while_running: Callable[[RunningService], Awaitable[None]] | None = None,
) -> int:
    """`greeksd run`: serve until SIGINT/SIGTERM (or `while_running` returns)."""
    service_holder: list[RunningService] = []

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            first = True
            async for signum in signals:
                name = signal.Signals(signum).name
                if first:
                    first = False
                    log.info("shutdown_requested", signal=name)
                    for service in service_holder:
                        service.stop()
                    if not service_holder:
                        top.cancel_scope.cancel()
                    continue
                saved = accepted = written = 0
                if service_holder:
                    state = service_holder[0].state
                    saved = state.writer.spool_unwritten_now(state.sink.take_overflow())
                    accepted, written = state.sink.accepted, state.writer.stats.rows_written
                log.error(
                    "second_signal_exiting_now",
                    signal=name,
                    accepted=accepted,
                    rows_written=written,
                    spooled_rows=saved,
                )
                os._exit(EXIT_SECOND_SIGNAL)

    async with trio.open_nursery() as top:
        await top.start(watch_signals)
        async with open_service(settings, sources) as service:
            service_holder.append(service)
            if while_running is not None:
                await while_running(service)
            else:
                await trio.sleep_forever()
        top.cancel_scope.cancel()
    return 0
