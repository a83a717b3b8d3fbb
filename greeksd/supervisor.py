"""The nursery tree: one cancel scope + child nursery per source, restarted on failure.

A source that raises is logged, marked `degraded` and restarted after bounded jittered
backoff inside its own scope; nothing else notices. `stop(name)` cancels the scope on
purpose (`disconnected`); `start(name)` opens a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import trio

from greeksd.backoff import Backoff
from greeksd.coverage import DEFAULT_STALE_S, Coverage
from greeksd.logs import get_logger, log_context
from greeksd.model import SnapshotSink, Source, StreamState, StreamStatus

log = get_logger("greeksd.supervisor")

# A source that stayed up this long is healthy again: its next failure backs off from
# the start instead of continuing the old, long delays.
HEALTHY_AFTER_S = 60.0


def _now() -> datetime:
    return datetime.now(UTC)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


class UnknownSource(KeyError):
    pass


class Supervisor:
    def __init__(
        self,
        sink: SnapshotSink,
        *,
        backoff_factory: Callable[[], Backoff] = lambda: Backoff(initial=1.0, maximum=60.0),
        stale_s: float = DEFAULT_STALE_S,
    ) -> None:
        self._sink = sink
        self._stale_s = stale_s
        self._backoff_factory = backoff_factory
        self._sources: dict[str, Source] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.registry: dict[str, StreamStatus] = {}

    def add(self, source: Source) -> None:
        self._sources[source.name] = source
        coverage = Coverage(source.name, self._stale_s)
        self.registry[source.name] = StreamStatus(source.name, coverage=coverage)

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def is_running(self, name: str) -> bool:
        return name in self._scopes

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sources' nursery; start every added source; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name in self._sources:
                self.start(name)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def start(self, name: str) -> bool:
        """Open a new scope for `name`; False if it is already running."""
        if name not in self._sources:
            raise UnknownSource(name)
        if name in self._scopes:
            return False
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running")
        scope = trio.CancelScope()
        self._scopes[name] = scope
        self._nursery.start_soon(self._supervise, name, scope, name=f"source:{name}")
        return True

    def stop(self, name: str) -> bool:
        """Cancel `name`'s scope; False if it was not running."""
        if name not in self._sources:
            raise UnknownSource(name)
        scope = self._scopes.pop(name, None)
        if scope is None:
            return False
        scope.cancel()
        status = self.registry[name]
        status.set_state(StreamState.DISCONNECTED, "stopped on request", now=_now())
        log.info("source_stopped", source=name)
        return True

    async def _supervise(self, name: str, scope: trio.CancelScope) -> None:
        source = self._sources[name]
        status = self.registry[name]
        backoff = self._backoff_factory()
        with log_context(broker=name), scope:
            while True:
                status.set_state(StreamState.CONNECTING, None, now=_now())
                started = trio.current_time()
                try:
                    async with trio.open_nursery() as child:
                        child.start_soon(source.run, self._sink, status)
                except Exception as exc:
                    if trio.current_time() - started > HEALTHY_AFTER_S:
                        backoff.reset()
                    delay = backoff.next_delay()
                    status.restarts += 1
                    status.last_error = _describe(exc)
                    status.set_state(
                        StreamState.DEGRADED, f"restarting in {delay:.1f}s", now=_now()
                    )
                    log.error(
                        "source_failed",
                        error=status.last_error,
                        restart_in_s=round(delay, 2),
                        restarts=status.restarts,
                        exc_info=True,
                    )
                    await trio.sleep(delay)
                    continue
                log.info("source_finished")
                break
        if self._scopes.get(name) is scope:
            del self._scopes[name]
            if not scope.cancel_called:
                status.set_state(StreamState.DISCONNECTED, "source finished", now=_now())
