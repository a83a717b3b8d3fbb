"""The HTTP server on its own trio loop, in its own OS thread.

Why: on one shared loop every runnable request task lengthened the loop's turn, and the
writer waits a turn at each step (channel receive, worker-thread round trip), so 200
busy connections multiplied writer p99 by 5-11 even with admission bounded (and /healthz
alone by ~20). On its own loop the HTTP server's tasks never sit in the writer's run
queue; the two threads only share the GIL (see README "Performance").

`serve_in_own_loop` runs in the service's nursery: it starts the thread, reports the
bound address like `hypercorn.trio.serve` does, and when its scope is cancelled fires
the HTTP loop's shutdown trigger and waits (uncancellably) for the thread to end, so
the thread never outlives the nursery. Handlers that must touch the service's own trio
objects (the supervisor's nursery, its cancel scopes) go through `call_on_loop`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import hypercorn.trio
import outcome
import trio
from hypercorn.config import Config as HypercornConfig

T = TypeVar("T")


async def call_on_loop(
    token: trio.lowlevel.TrioToken | None, fn: Callable[..., T], *args: Any
) -> T:
    """`fn(*args)` on the loop behind `token` (directly when that is this loop, or when
    there is no other loop), awaited from this one without a worker thread. The wait is
    shielded: once queued the call runs anyway, and it is short (no I/O)."""
    here = trio.lowlevel.current_trio_token()
    if token is None or token is here:
        return fn(*args)
    done = trio.Event()
    result: list[outcome.Outcome[T]] = []

    def run_there() -> None:
        result.append(outcome.capture(fn, *args))
        here.run_sync_soon(done.set)

    token.run_sync_soon(run_there)
    with trio.CancelScope(shield=True):
        await done.wait()
    return result[0].unwrap()


class _OfferTheGil(trio.abc.Instrument):
    """After every task step of the HTTP loop, release the GIL for a moment.

    Why: both loops share the GIL, and a thread that gives it up for I/O (every socket
    call, every worker-thread hand-off of the service's loop) otherwise waits up to the
    switch interval (5 ms) to get it back from a busy HTTP thread, at each step; the
    writer's p99 under 200 readers stayed 3-5x its quiet value. Offering it after each
    step brought that to 1.4-2x, at the price of fewer reads served while the writer is
    busy (README "Performance"); releasing costs one syscall per step."""

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        time.sleep(0)


@dataclass
class _Handoff:
    """What the two threads share about the HTTP loop; the lock orders a stop request
    that comes before the loop has started against the loop's start."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    token: trio.lowlevel.TrioToken | None = None
    shutdown: trio.Event | None = None
    stop_requested: bool = False
    bound: str = ""

    def attach(self, token: trio.lowlevel.TrioToken, shutdown: trio.Event) -> None:
        """In the HTTP thread, once its loop runs."""
        with self.lock:
            self.token, self.shutdown = token, shutdown
            if self.stop_requested:
                shutdown.set()

    def request_stop(self) -> None:
        """From the service's loop: fire the HTTP loop's shutdown trigger."""
        with self.lock:
            self.stop_requested = True
            if self.token is None or self.shutdown is None:
                return
            # RunFinishedError: the loop already ended on its own (its error is raised).
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.shutdown.set)


async def _http_main(
    app: Any, config: HypercornConfig, handoff: _Handoff, started: Callable[[], None]
) -> None:
    shutdown = trio.Event()
    handoff.attach(trio.lowlevel.current_trio_token(), shutdown)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown.wait)
        )
        handoff.bound = binds[0]
        started()


async def serve_in_own_loop(
    app: Any,
    config: HypercornConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on a new trio loop in a new thread until cancelled; `started` with the
    first bound address. A failure to bind, or a crash of the server, is raised here."""
    handoff = _Handoff()
    main_token = trio.lowlevel.current_trio_token()
    ready = trio.Event()

    def run_thread() -> None:
        trio.run(
            _http_main,
            app,
            config,
            handoff,
            partial(main_token.run_sync_soon, ready.set),
            instruments=[_OfferTheGil()],
        )

    async def run_and_report(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        # Not abandoned on cancel: this task returns only once the thread has ended.
        await trio.to_thread.run_sync(
            run_thread, abandon_on_cancel=False, limiter=trio.CapacityLimiter(1)
        )
        nursery.cancel_scope.cancel()  # ended: nothing left to stop

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            handoff.request_stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_cancel)
        await nursery.start(run_and_report)
        # If the thread fails before binding, run_and_report raises and the nursery
        # cancels this wait.
        await ready.wait()
        task_status.started(handoff.bound)
