"""One link for `greeksd probe`, run by the same link runner as the stream.

A probe does its broker's REST steps itself (to time them and to add its own
diagnostics), then hands the runner one `LinkTarget` whose Connection is the stream's
own, wrapped in `Observed`: every batch of events the Connection returns is shown to the
probe on its way to the runner, and the link ends `duration_s` after it opened. So the
probe has no handshake, merge or socket loop of its own, and what it reports is what the
stream would do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio

from greeksd.backoff import Address
from greeksd.brokers.link import (
    BrokerClient,
    BrokerStream,
    Call,
    Connection,
    Event,
    LinkFailed,
    LinkTarget,
)
from greeksd.model import SnapshotSink, StreamStatus

Notice = Callable[[list[Event]], None]
"""What the probe does with each batch of events (before the runner performs them)."""


@dataclass
class _OneLink:
    """A `BrokerClient` whose REST work before the socket is done already; calls during
    the link go to the broker's real client."""

    client: BrokerClient
    target: LinkTarget

    def address(self) -> Address | None:
        return self.client.address()

    async def open_link(self, status: StreamStatus, fresh_credentials: bool) -> LinkTarget:
        return self.target

    async def call(self, call: Call) -> Any:
        return await self.client.call(call)


class Observed:
    """A Connection whose events the probe sees first; `listening` is the probe's scope,
    whose deadline ends the link `duration_s` after it opened (or after the connect
    timeout plus `duration_s`, if it never opens)."""

    def __init__(
        self,
        conn: Connection,
        notice: Notice,
        summary: dict[str, Any],
        elapsed_ms: Callable[[], float],
        listening: trio.CancelScope,
        duration_s: float,
        connect_timeout: float,
    ) -> None:
        self.conn = conn
        self.notice = notice
        self.summary = summary
        self.elapsed_ms = elapsed_ms
        self.listening = listening
        self.duration_s = duration_s
        self.connect_started = elapsed_ms()
        listening.deadline = trio.current_time() + connect_timeout + duration_s

    def _seen(self, events: list[Event]) -> list[Event]:
        self.notice(events)
        return events

    def start(self, now: float, at: datetime) -> list[Event]:
        self.summary["connect_ms"] = round(self.elapsed_ms() - self.connect_started, 1)
        self.listening.deadline = now + self.duration_s
        return self._seen(self.conn.start(now, at))

    def receive(self, data: str | bytes, now: float, at: datetime) -> list[Event]:
        self.summary.setdefault("first_message_ms", self.elapsed_ms())
        return self._seen(self.conn.receive(data, now, at))

    def set_positions(self, positions: Sequence[Any], now: float, at: datetime) -> list[Event]:
        return self._seen(self.conn.set_positions(positions, now, at))

    def answer(self, call: Call, result: Any, now: float, at: datetime) -> list[Event]:
        return self._seen(self.conn.answer(call, result, now, at))

    def on_timer(self, now: float, at: datetime) -> list[Event]:
        return self._seen(self.conn.on_timer(now, at))

    def next_deadline(self) -> float:
        return self.conn.next_deadline()


async def probe_link(
    name: str,
    client: BrokerClient,
    target: LinkTarget,
    listening: trio.CancelScope,
    sink: SnapshotSink,
) -> LinkFailed | None:
    """Run the one link of `target` (its connection an `Observed`) until `listening`'s
    deadline; how it failed, or None when it lasted."""
    one = _OneLink(client, target)
    stream = BrokerStream(name, lambda: nullcontext(one))
    with listening:
        failure = await stream.attempt(one, sink, StreamStatus(name), False)
        return LinkFailed(failure.reason, failure.fresh_credentials)
    return None
