"""The running service: database, pipeline, supervisor, partition keeper, HTTP, signals.

    trio.run
    └── signal watcher + service scope
        └── pipeline (writer + overflow pump)      ← closed last, so it drains
            └── inner nursery: supervisor (one scope per broker), partition keeper, HTTP

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

import hypercorn.trio
import psycopg
import trio
from hypercorn.config import Config as HypercornConfig

from greeksd.api.app import create_app
from greeksd.api.state import ServiceState, open_read_pool
from greeksd.config import ConfigError, Settings
from greeksd.logs import get_logger
from greeksd.model import Source
from greeksd.pipeline import open_pipeline
from greeksd.redact import register_secret
from greeksd.store.database import embedded_postgres
from greeksd.store.migrations import migrate
from greeksd.store.partitions import drop_expired, ensure_partitions
from greeksd.store.spool import Spool
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


def _maintain_partitions(url: str, days_ahead: int, retention_days: int) -> None:
    today = datetime.now(UTC).date()
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_partitions(conn, today, days_ahead)
        drop_expired(conn, today, retention_days)


async def keep_partitions(
    url: str, days_ahead: int, retention_days: int, interval_s: float = 3600.0
) -> None:
    """Create tomorrow's partitions before midnight and drop expired ones, hourly."""
    while True:
        try:
            await trio.to_thread.run_sync(_maintain_partitions, url, days_ahead, retention_days)
            delay = interval_s
        except psycopg.Error as exc:
            log.error("partition_maintenance_failed", error=str(exc).strip(), retry_in_s=60)
            delay = min(60.0, interval_s)
        await trio.sleep(delay)


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
    binds: list[str] = await nursery.start(
        partial(
            hypercorn.trio.serve, create_app(state), config, shutdown_trigger=trio.sleep_forever
        )
    )
    return binds[0]


@contextlib.asynccontextmanager
async def open_service(
    settings: Settings, sources: Sequence[Source]
) -> AsyncIterator[RunningService]:
    """Start everything; leaving the block (or `stop()`) shuts down in order."""
    check_api_exposure(settings)
    for secret in settings.secrets():
        register_secret(secret)
    with database_url(settings) as url:
        await trio.to_thread.run_sync(migrate, url)
        await trio.to_thread.run_sync(
            _maintain_partitions, url, settings.partition_days_ahead, settings.retention_days
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
            ) as pipeline,
        ):
            supervisor = Supervisor(pipeline.sink)
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
            )
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    keep_partitions, url, settings.partition_days_ahead, settings.retention_days
                )
                api_url = await _serve_http(state, inner)
                await inner.start(supervisor.run)
                log.info(
                    "service_started",
                    api=api_url,
                    sources=",".join(supervisor.names),
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
