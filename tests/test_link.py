"""The link runner (greeksd.brokers.link.BrokerStream) on a real socket, driven by the
test-only toy broker's Connection (tests/toy_broker.py): calls answered, timer deadlines,
rejected frames counted, and a new Connection after every end of a link."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from greeksd.backoff import Backoff
from greeksd.model import StreamState, StreamStatus
from tests.helpers import ListSink, wait_until
from tests.toy_broker import (
    NAME,
    ToyClient,
    ToyServer,
    ToySettings,
    open_toy_server,
    toy_book,
    toy_stream,
)


@dataclass
class Run:
    server: ToyServer
    client: ToyClient
    status: StreamStatus
    sink: ListSink

    def up(self, links: int = 1) -> bool:
        """`links` links opened so far, and the last one carries data."""
        return (
            self.server.links_opened == links
            and len(self.client.connections) == links
            and self.status.state is StreamState.CONNECTED
        )


@asynccontextmanager
async def toy_running(ping_s: float = 3600.0) -> AsyncIterator[Run]:
    """The toy server and a toy stream on it, its first link up."""
    async with open_toy_server(toy_book()) as server, trio.open_nursery() as nursery:
        client = ToyClient(ToySettings(server.url, ping_s))
        run = Run(server, client, StreamStatus(NAME), ListSink())
        stream = toy_stream(run.client, backoff=Backoff(initial=0.01, maximum=0.05))
        nursery.start_soon(stream.run, run.sink, run.status)
        await wait_until(run.up, what="the first link up")
        yield run
        nursery.cancel_scope.cancel()


async def test_a_call_is_answered_and_the_answer_drives_the_link() -> None:
    """`hello` makes the Connection ask for the positions; the runner performs the call
    on its own task and hands the result to `answer`, whose Tracked and Send the runner
    carries out: status, then the subscribe frame, then rows into the sink."""
    async with toy_running() as run:
        book = run.server.book
        assert run.server.ops("subscribe") == [
            {"op": "subscribe", "keys": [c.key_text for c in book]}
        ]
        assert run.status.subscriptions == len(book)
        assert set(run.client.connections[0].contracts) == {c.key_text for c in book}

        await run.server.tick(book[1], -0.25, 1_900_000_000_000)
        await wait_until(lambda: len(run.sink.rows) == 1, what="the row")
        row = run.sink.rows[0]
        assert (row.broker, row.account_id, row.contract_key, row.delta) == (
            NAME,
            "TOY-1",
            book[1].key_text,
            -0.25,
        )
        assert row.event_time.timestamp() == 1_900_000_000.0
        assert run.status.ticks == 1 and run.status.last_message_at is not None


async def test_timer_deadlines_fire_and_never_early() -> None:
    async with toy_running(ping_s=0.05) as run:
        await wait_until(lambda: len(run.server.ops("ping")) >= 3, what="three pings")
        calls = run.client.connections[0].timer_calls
        assert len(calls) >= 3
        assert all(now >= deadline for deadline, now in calls), calls


async def test_a_frame_that_moves_the_deadline_wakes_the_timer() -> None:
    """The next ping is an hour away until a frame says otherwise: the runner must read
    the new deadline after every frame, not sleep through the old one."""
    async with toy_running(ping_s=3600.0) as run:
        assert run.server.ops("ping") == []
        await run.server.send({"op": "ping_in", "s": 0.05})
        await wait_until(lambda: len(run.server.ops("ping")) == 1, what="the moved ping")
        assert run.client.connections[0].next_deadline() > trio.current_time() + 3000


async def test_rejected_frames_are_counted_and_the_link_stays_up() -> None:
    async with toy_running() as run:
        book = run.server.book
        await run.server.send("not json at all")
        await run.server.send({"op": "dance"})
        await run.server.send({"op": "tick", "key": "NOPE 2031-01-17 C 1", "delta": 1, "t": 0})
        await run.server.tick(book[0], 0.5, 1_900_000_000_000)
        await wait_until(lambda: len(run.sink.rows) == 1, what="the good tick after the bad")
        assert run.status.rejected_frames == 3
        assert (run.status.reconnects, run.status.state) == (0, StreamState.CONNECTED)


async def test_link_failed_ends_the_link_and_the_next_one_has_a_new_connection() -> None:
    async with toy_running() as run:
        await run.server.send({"op": "bye", "reason": "maintenance"})
        await wait_until(lambda: run.up(links=2), what="the second link up")
        first, second = run.client.connections
        assert first is not second
        assert set(second.contracts) == set(first.contracts)  # subscribed again
        assert len(run.server.ops("subscribe")) == 2
        assert run.status.reconnects == 1
        assert run.status.last_error == "server said bye: maintenance"


async def test_a_closed_socket_ends_the_link_and_the_next_one_has_a_new_connection() -> None:
    async with toy_running() as run:
        await run.server.close_links()
        await wait_until(lambda: run.up(links=2), what="the second link up")
        assert run.status.reconnects == 1
        assert (run.status.last_error or "").startswith("websocket closed")
        first, second = run.client.connections
        assert first is not second and second.next_deadline() < math.inf
