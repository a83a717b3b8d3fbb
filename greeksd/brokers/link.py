"""The one I/O shell for broker websockets, and the vocabulary its Connections speak.

A broker's protocol behaviour lives in one pure `Connection` per link (h11/wsproto
style): frames, REST answers and clock readings in, a list of events out. This module is
the only place that does the I/O those events ask for, for every broker:

    BrokerStream.run                      (the Source the supervisor runs)
    └── per attempt: client.open_link()   (the broker's REST work before a socket)
        └── link nursery
            ├── reader   socket → recorder → Connection.receive → perform
            ├── timers   sleep until Connection.next_deadline() → on_timer → perform
            ├── sender   Send events, in order, one at a time
            └── calls    one task per Call → client.call → Connection.answer → perform

`perform` is synchronous: rows go to the sink, frames to the sender's queue, calls to
new tasks; so between a frame and the rows it produced there is no await, and a
recording's order is the order in which the Connection's state changed.

A `LinkFailed` event, a closed socket or a `LinkDown` from the client ends the attempt;
`run` then waits (`Reconnect`: backoff if the server answered, a cheap TCP probe while it
is unreachable, or the exact wait a broker asked for, such as IBKR's penalty box) and
starts over with a new Connection. `replay`, the probes and the benchmarks drive the same
Connections without this shell.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    open_websocket_url,
)

from greeksd.backoff import Address, Backoff, Reconnect
from greeksd.logs import get_logger, log_context
from greeksd.model import (
    Recorder,
    Snapshot,
    SnapshotSink,
    StreamState,
    StreamStatus,
    Trade,
)

log = get_logger("greeksd.link")


# ---- what a Connection asks for ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """A frame to send on the websocket, after every frame asked for before it."""

    data: str


@dataclass(frozen=True, slots=True)
class Call:
    """A REST call the protocol wants made, in the broker's own vocabulary (`name`,
    `args`); its answer comes back through `Connection.answer(call, result, …)`."""

    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class CallFailed:
    """What `answer` gets instead of a result when a call failed (HTTP error, timeout).
    `kind` is the broker client's classification (e.g. "penalty_box")."""

    reason: str
    kind: str = "error"
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class LinkUp:
    """The link carries data now: the stream is `connected`, the backoff starts over."""


@dataclass(frozen=True, slots=True)
class Degraded:
    """The link is up but something stops (some) data: the stream is `degraded`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Recovered:
    """The problem a `Degraded` reported is over: `connected` again."""


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """This link is finished. `fresh_credentials`: the next attempt must not reuse the
    credentials this one used (a refused token); `wait_s`: no attempt before then."""

    reason: str
    fresh_credentials: bool = False
    wait_s: float | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame (or part of one) that could not be used: counted and logged, never
    silently dropped."""

    kind: str
    reason: str
    excerpt: str = ""


@dataclass(frozen=True, slots=True)
class Tracked:
    """The positions the link streams from now on (for status and the recorder:
    `details` go into the recording's `positions` record)."""

    positions: Sequence[Any]
    subscriptions: int
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Note:
    """A log line the protocol wants written (`level`: debug, info, warning, error)."""

    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    level: str = "info"


Event = (
    Snapshot
    | Trade
    | Send
    | Call
    | LinkUp
    | Degraded
    | Recovered
    | LinkFailed
    | Rejected
    | Tracked
    | Note
)


class Connection(Protocol):
    """One link's whole protocol, without I/O. `now` is a monotonic clock (deadlines),
    `at` the wall clock (rows' `received_at`); nothing here reads a clock itself."""

    def start(self, now: float, at: datetime) -> list[Event]:
        """The socket is open: what to send first."""
        ...

    def receive(self, data: str | bytes, now: float, at: datetime) -> list[Event]: ...

    def set_positions(self, positions: Sequence[Any], now: float, at: datetime) -> list[Event]:
        """Stream these positions from now on (what a `Tracked` event carried: replay
        feeds a recording's `positions` records back through here)."""
        ...

    def answer(self, call: Call, result: Any, now: float, at: datetime) -> list[Event]:
        """The result of a `Call` this connection asked for (a `CallFailed` if it failed)."""
        ...

    def on_timer(self, now: float, at: datetime) -> list[Event]:
        """Called at (or after) `next_deadline()`, and whenever else the runner likes."""
        ...

    def next_deadline(self) -> float:
        """When `on_timer` must run next (monotonic seconds; `math.inf`: never)."""
        ...


# ---- what a broker's client gives the runner ---------------------------------------------
@dataclass(frozen=True)
class LinkTarget:
    """Where and how to open the next websocket, and the Connection that speaks on it."""

    url: str
    connection: Connection
    headers: Sequence[tuple[bytes, bytes]] = ()
    ssl_context: ssl.SSLContext | None = None
    max_message_size: int = 1 << 20
    connect_timeout: float = 10.0
    record: Mapping[str, Any] = field(default_factory=dict)
    """Details of the recording's `link` record (what replay needs to rebuild the
    Connection the same way, e.g. DXLink's channel number)."""


class LinkDown(Exception):
    """An attempt failed outside the Connection (REST before the socket, a call that
    ends the session). `address`: the server to probe before retrying (None when it
    answered, so only the backoff applies)."""

    def __init__(
        self,
        reason: str,
        *,
        address: Address | None = None,
        fresh_credentials: bool = False,
        wait_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.address = address
        self.fresh_credentials = fresh_credentials
        self.wait_s = wait_s


class BrokerClient(Protocol):
    """A broker's REST side for one run of its stream: I/O only, no protocol rules."""

    def address(self) -> Address | None:
        """The websocket server, probed when a link to it fails."""
        ...

    async def open_link(self, status: StreamStatus, fresh_credentials: bool) -> LinkTarget:
        """The REST work before a socket (session, positions, token); raises LinkDown."""
        ...

    async def call(self, call: Call) -> Any:
        """Perform one `Call`: its result, or a `CallFailed`. Raises LinkDown only when
        the failure ends the link (the session is gone)."""
        ...


def describe(exc: BaseException) -> str:
    """A short reason for status and logs (exceptions carry no cookies or tokens)."""
    if isinstance(exc, LinkDown):
        return exc.reason
    if isinstance(exc, ConnectionRejected):
        return f"websocket upgrade refused (HTTP {exc.status_code})"
    if isinstance(exc, ConnectionClosed):
        why = exc.reason
        return f"websocket closed ({why.code} {why.name})" if why else "websocket closed"
    if isinstance(exc, HandshakeError):
        cause = exc.__cause__ or exc
        return f"websocket connect failed: {type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}"


TRANSPORT_ERRORS = (HandshakeError, ConnectionClosed, trio.BrokenResourceError, OSError)


def _now() -> datetime:
    return datetime.now(UTC)


COVERAGE_CHECK_S = 1.0
"""How often a link's coverage is judged (more often when `stale_s` is shorter)."""


def _check_interval(stale_s: float) -> float:
    return min(COVERAGE_CHECK_S, stale_s / 4) if stale_s > 0 else math.inf


class _Attempt:
    """One websocket link: the Connection, its socket's tasks, and how it ended."""

    def __init__(
        self,
        stream: BrokerStream,
        client: BrokerClient,
        target: LinkTarget,
        sink: SnapshotSink,
        status: StreamStatus,
    ) -> None:
        self.stream = stream
        self.client = client
        self.conn = target.connection
        self.sink = sink
        self.status = status
        self.failure: LinkFailed | None = None
        self.problem: str | None = None  # what the Connection's last Degraded said
        self.up_since: datetime | None = None  # when LinkUp came (wall clock)
        self.covered = True  # False while coverage degrades the stream
        coverage = status.coverage
        self.check_every = _check_interval(coverage.stale_s if coverage else 0.0)
        self.check_at = math.inf
        self.outbox_in, self.outbox_out = trio.open_memory_channel[str](math.inf)
        self.wake = trio.Event()
        self.sleeping_until = math.inf  # the deadline the timer task sleeps until
        self.nursery: trio.Nursery | None = None

    def fail(self, failure: LinkFailed) -> None:
        if self.failure is None:
            self.failure = failure
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    def perform(self, events: list[Event], at: datetime) -> None:
        """Do what the Connection asked, in order, without awaiting."""
        status, stream = self.status, self.stream
        put, source = self.sink.put, stream.name
        for event in events:
            cls = event.__class__
            if cls is Snapshot:
                event.source = source  # type: ignore[union-attr,misc]
                put(event)  # type: ignore[arg-type]
                status.ticks += 1
            elif cls is Send:
                self.outbox_in.send_nowait(event.data)  # type: ignore[union-attr]
            elif cls is Trade:
                self.sink.put_trade(event)  # type: ignore[arg-type]
            elif isinstance(event, Call):
                assert self.nursery is not None
                self.nursery.start_soon(self.call, event)
            elif isinstance(event, Rejected):
                status.rejected_frames += 1
                log.warning(
                    "frame_rejected", kind=event.kind, reason=event.reason, excerpt=event.excerpt
                )
            elif isinstance(event, Tracked):
                status.subscriptions = event.subscriptions
                if stream.recorder is not None:
                    stream.recorder.positions(stream.name, event.positions, at, **event.details)
            elif isinstance(event, LinkUp):
                self.up_since = at
                self.problem = None
                self.check_at = trio.current_time() + self.check_every
                stream.backoff.reset()
                self.settle(at)
                log.info("link_up", subscriptions=status.subscriptions)
            elif isinstance(event, Degraded):
                self.problem = event.reason
                status.last_error = event.reason
                self.settle(at)
                log.warning("link_degraded", reason=event.reason)
            elif isinstance(event, Recovered):
                if self.problem is not None:
                    self.problem = None
                    self.settle(at)
                    log.info("link_recovered")
            elif isinstance(event, LinkFailed):
                self.fail(event)
            elif isinstance(event, Note):
                getattr(log, event.level)(event.event, **event.fields)
        # Wake the timer task only for an earlier deadline: most frames move one later
        # (a silence watchdog), and a later one is found when the timer wakes anyway.
        if min(self.conn.next_deadline(), self.check_at) < self.sleeping_until:
            self.wake.set()

    def settle(self, at: datetime) -> None:
        """The state the link's problems add up to: the Connection's own (a refused
        channel, a penalty box) first, then what coverage says is missing."""
        status = self.status
        reason = "; ".join(
            r for r in (self.problem, None if self.covered else status.coverage_reason) if r
        )
        if reason:
            status.set_state(StreamState.DEGRADED, reason, now=at)
        elif self.up_since is not None:
            status.set_state(StreamState.CONNECTED, now=at)

    def check_coverage(self, now: float, at: datetime) -> None:
        """Coverage is judged on a timer, not per tick: the state changes only when no
        contract at all is fresh (or is again), the reason names partial gaps."""
        self.check_at = now + self.check_every
        status = self.status
        coverage = status.coverage
        if coverage is None:
            return
        verdict = coverage.assess(at, self.up_since, status.last_message_at)
        covered = not verdict.degraded
        if covered == self.covered and verdict.reason == status.coverage_reason:
            return
        status.coverage_reason = verdict.reason
        if covered != self.covered:
            self.covered = covered
            if covered:
                log.info("coverage_recovered")
            else:
                log.warning("coverage_degraded", reason=verdict.reason)
        self.settle(at)

    async def run(self, target: LinkTarget) -> None:
        stream = self.stream
        async with open_websocket_url(
            target.url,
            ssl_context=target.ssl_context,
            extra_headers=list(target.headers),
            max_message_size=target.max_message_size,
            connect_timeout=target.connect_timeout,
            disconnect_timeout=1.0,
        ) as ws:
            at = _now()
            if stream.recorder is not None:
                stream.recorder.link(stream.name, at, **target.record)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.perform(self.conn.start(trio.current_time(), at), at)
                nursery.start_soon(self.guard, self.send_loop, ws)
                nursery.start_soon(self.guard, self.timer_loop)
                nursery.start_soon(self.guard, self.read_loop, ws)

    async def guard(self, task: Callable[..., Any], *args: Any) -> None:
        """Turn the end of the socket into this link's failure, cancelling its siblings."""
        try:
            await task(*args)
        except LinkDown as exc:
            self.fail(LinkFailed(exc.reason, exc.fresh_credentials, exc.wait_s))
        except TRANSPORT_ERRORS as exc:
            self.fail(LinkFailed(describe(exc)))

    async def read_loop(self, ws: Any) -> None:
        conn, status = self.conn, self.status
        recorder, name = self.stream.recorder, self.stream.name
        while True:
            data = await ws.get_message()
            at = _now()
            status.last_message_at = at
            if recorder is not None:
                recorder.frame(name, data, at)
            self.perform(conn.receive(data, trio.current_time(), at), at)

    async def timer_loop(self) -> None:
        conn = self.conn
        while True:
            self.sleeping_until = min(conn.next_deadline(), self.check_at)
            with trio.move_on_at(self.sleeping_until):
                await self.wake.wait()
            self.wake = trio.Event()
            now = trio.current_time()
            if now >= conn.next_deadline():
                at = _now()
                self.perform(conn.on_timer(now, at), at)
            if now >= self.check_at:
                self.check_coverage(now, _now())

    async def send_loop(self, ws: Any) -> None:
        async for data in self.outbox_out:
            await ws.send_message(data)

    async def call(self, call: Call) -> None:
        try:
            result = await self.client.call(call)
        except LinkDown as exc:
            self.fail(LinkFailed(exc.reason, exc.fresh_credentials, exc.wait_s))
            return
        at = _now()
        self.perform(self.conn.answer(call, result, trio.current_time(), at), at)


class BrokerStream:
    """The `Source` of one broker login: links, one after another, for ever."""

    def __init__(
        self,
        name: str,
        open_client: Callable[[], AbstractAsyncContextManager[BrokerClient]],
        *,
        backoff: Backoff | None = None,
        probe_interval_s: float = 2.0,
        recorder: Recorder | None = None,
    ) -> None:
        self.name = name
        self.open_client = open_client
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self.reconnect = Reconnect(self.backoff, probe_interval=probe_interval_s)
        self.recorder = recorder

    async def run(self, sink: SnapshotSink, status: StreamStatus) -> None:
        with log_context(broker=self.name):
            async with self.open_client() as client:
                fresh = False
                while True:
                    status.set_state(StreamState.CONNECTING, now=_now())
                    failure = await self.attempt(client, sink, status, fresh)
                    fresh = failure.fresh_credentials
                    status.last_error = failure.reason
                    status.reconnects += 1
                    status.set_state(StreamState.DEGRADED, failure.reason, now=_now())
                    log.warning("link_lost", reason=failure.reason)
                    await self.pause(status, failure)

    async def attempt(
        self, client: BrokerClient, sink: SnapshotSink, status: StreamStatus, fresh: bool
    ) -> _Failure:
        """One link, from the REST work before it to its end; returns why it ended."""
        try:
            target = await client.open_link(status, fresh)
        except LinkDown as exc:
            return _Failure(exc.reason, exc.fresh_credentials, exc.wait_s, exc.address)
        attempt = _Attempt(self, client, target, sink, status)
        try:
            await attempt.run(target)
        except TRANSPORT_ERRORS as exc:  # opening or closing the socket
            return _Failure(describe(exc), address=client.address())
        ended = attempt.failure or LinkFailed("websocket closed")
        return _Failure(ended.reason, ended.fresh_credentials, ended.wait_s, client.address())

    async def pause(self, status: StreamStatus, failure: _Failure) -> None:
        if failure.wait_s is not None and failure.wait_s > 0:
            log.warning("reconnect_wait", seconds=round(failure.wait_s, 1))
            await trio.sleep(failure.wait_s)
            return
        await self.reconnect.pause(status, failure.address)


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    fresh_credentials: bool = False
    wait_s: float | None = None
    address: Address | None = None
