"""A third broker that exists only in the test suite: "toy".

It is what adding a broker takes, and nothing more: a pure `ToyConnection` (the whole
protocol, link.py's `Connection`), a `ToyClient` (its REST side, link.py's
`BrokerClient`), its own settings table (`GREEKSD_TOY_*`) and one `BrokerSpec`; a test
registers it with one line (the `toy_registered` fixture). Its server, `ToyServer`, is
a real websocket server on a loopback socket.

The toy protocol, JSON text frames:

    server  {"op": "hello"}                          the link is open; the client wants
                                                     the positions (a REST `Call`)
    client  {"op": "subscribe", "keys": [...]}       once it has them
    server  {"op": "subscribed"}                     the link carries data (`LinkUp`)
    server  {"op": "tick", "key": K, "delta": D, "t": MS}    one row
    client  {"op": "ping"}                           every `ping_s` (a timer deadline)
    server  {"op": "ping_in", "s": S}                the next ping in S seconds
    server  {"op": "bye", "reason": R}               the link is over (`LinkFailed`)
    anything else                                    refused (`Rejected`), counted

Positions are the client's REST: one request on the server's `/positions` path (a
websocket too, so one tiny server does both), answering a JSON list of contracts.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from greeksd.backoff import Address, Backoff, url_address
from greeksd.brokers.link import (
    TRANSPORT_ERRORS,
    BrokerClient,
    BrokerStream,
    Call,
    CallFailed,
    Event,
    LinkFailed,
    LinkTarget,
    LinkUp,
    Rejected,
    Send,
    Tracked,
    describe,
)
from greeksd.brokers.spec import BrokerSpec, Replayer
from greeksd.model import Contract, ContractKey, Recorder, Snapshot, Source, StreamStatus
from greeksd.recording import contract_from_json, contract_json
from greeksd.replay import ConnectionReplayer
from greeksd.settings_table import positive_float, setting

NAME = "toy"
PING = orjson.dumps({"op": "ping"}).decode()


# ---- the broker: settings, Connection, client, spec ---------------------------------------
@dataclass(frozen=True)
class ToySettings:
    """`GREEKSD_TOY_*`."""

    url: str = setting("ws://127.0.0.1:9", str, "toy server base URL")
    ping_s: float = setting("5", positive_float, "seconds between pings")


@dataclass
class ToyConnection:
    """The toy protocol for one link: frames, answers and clock readings in, events out."""

    ping_s: float
    contracts: dict[str, Contract] = field(default_factory=dict)
    next_ping: float = math.inf
    timer_calls: list[tuple[float, float]] = field(default_factory=list)
    """(deadline, now) of every `on_timer` call: the runner must never call it early."""

    def start(self, now: float, at: datetime) -> list[Event]:
        self.next_ping = now + self.ping_s
        return []

    def receive(self, data: str | bytes, now: float, at: datetime) -> list[Event]:
        try:
            message = orjson.loads(data)
            op = message["op"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return [Rejected("malformed_frame", "not a toy frame", str(data)[:80])]
        if op == "hello":
            return [Call("positions")]
        if op == "subscribed":
            return [LinkUp()]
        if op == "tick":
            return [self.row(message, at)]
        if op == "ping_in":
            self.next_ping = now + float(message["s"])
            return []
        if op == "bye":
            return [LinkFailed(f"server said bye: {message.get('reason')}")]
        return [Rejected("unknown_op", f"unknown op {op!r}", str(data)[:80])]

    def row(self, message: dict[str, Any], at: datetime) -> Snapshot | Rejected:
        contract = self.contracts.get(message.get("key", ""))
        if contract is None:
            return Rejected("unknown_contract", f"tick for {message.get('key')!r}")
        return Snapshot.for_contract(
            NAME,
            contract,
            event_time=datetime.fromtimestamp(message["t"] / 1000, UTC),
            received_at=at,
            delta=message["delta"],
        )

    def set_positions(self, positions: Sequence[Any], now: float, at: datetime) -> list[Event]:
        self.contracts = {c.key_text: c for c in positions}
        subscribe = {"op": "subscribe", "keys": list(self.contracts)}
        return [Tracked(positions, len(positions)), Send(orjson.dumps(subscribe).decode())]

    def answer(self, call: Call, result: Any, now: float, at: datetime) -> list[Event]:
        if isinstance(result, CallFailed):
            return [LinkFailed(f"positions: {result.reason}")]
        return self.set_positions(result, now, at)

    def on_timer(self, now: float, at: datetime) -> list[Event]:
        self.timer_calls.append((self.next_ping, now))
        if now < self.next_ping:
            return []
        self.next_ping = now + self.ping_s
        return [Send(PING)]

    def next_deadline(self) -> float:
        return self.next_ping


class ToyClient:
    """The toy broker's REST side; keeps every Connection it made, for the tests."""

    def __init__(self, settings: ToySettings) -> None:
        self.settings = settings
        self.connections: list[ToyConnection] = []

    def address(self) -> Address | None:
        return url_address(self.settings.url)

    async def open_link(self, status: StreamStatus, fresh_credentials: bool) -> LinkTarget:
        connection = ToyConnection(self.settings.ping_s)
        self.connections.append(connection)
        return LinkTarget(url=self.settings.url + "/stream", connection=connection)

    async def call(self, call: Call) -> Any:
        try:
            async with open_websocket_url(self.settings.url + "/positions") as ws:
                data = await ws.get_message()
        except TRANSPORT_ERRORS as exc:
            return CallFailed(describe(exc))
        return [contract_from_json(c) for c in orjson.loads(data)]


def toy_stream(
    client: BrokerClient,
    recorder: Recorder | None = None,
    backoff: Backoff | None = None,
    *,
    name: str = NAME,
) -> BrokerStream:
    @asynccontextmanager
    async def open_client() -> AsyncIterator[BrokerClient]:
        yield client

    return BrokerStream(name, open_client, backoff=backoff, probe_interval_s=0.2, recorder=recorder)


def _stream(name: str, settings: ToySettings, recorder: Recorder | None) -> Source:
    return toy_stream(ToyClient(settings), recorder, name=name)


def _replayer() -> Replayer:
    def connect(link: Mapping[str, Any]) -> ToyConnection:
        return ToyConnection(ping_s=math.inf)

    def positions(record: Mapping[str, Any]) -> list[Contract]:
        return [contract_from_json(c) for c in record["positions"]]

    return ConnectionReplayer(connect, positions)


SPEC = BrokerSpec(
    name=NAME, settings=ToySettings, prefix="TOY_", stream=_stream, replayer=_replayer
)


# ---- its server ---------------------------------------------------------------------------
class ToyServer:
    """A toy broker on a real loopback socket: `/positions` answers the book, `/stream`
    says hello and acknowledges subscriptions; the test sends the rest."""

    def __init__(self, book: Sequence[Contract]) -> None:
        self.book = list(book)
        self.url = ""
        self.links: list[WebSocketConnection] = []
        self.links_opened = 0
        self.received: list[dict[str, Any]] = []

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["op"] == op]

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self.handle, "127.0.0.1", 0, None)
            self.url = f"ws://127.0.0.1:{server.port}"
            task_status.started()

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        if request.path == "/positions":
            await ws.send_message(orjson.dumps([contract_json(c) for c in self.book]).decode())
            await ws.aclose()
            return
        self.links_opened += 1
        self.links.append(ws)
        try:
            await ws.send_message('{"op": "hello"}')
            while True:
                message = orjson.loads(await ws.get_message())
                self.received.append(message)
                if message["op"] == "subscribe":
                    await ws.send_message('{"op": "subscribed"}')
        except ConnectionClosed:
            pass
        finally:
            self.links.remove(ws)

    async def send(self, frame: str | dict[str, Any]) -> None:
        """`frame` (a dict: as JSON) on every open link."""
        text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        for ws in list(self.links):
            await ws.send_message(text)

    async def tick(self, contract: Contract, delta: float, t_ms: int) -> None:
        await self.send({"op": "tick", "key": contract.key_text, "delta": delta, "t": t_ms})

    async def close_links(self) -> None:
        for ws in list(self.links):
            await ws.aclose()


@asynccontextmanager
async def open_toy_server(book: Sequence[Contract]) -> AsyncIterator[ToyServer]:
    server = ToyServer(book)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def toy_book(account: str = "TOY-1") -> list[Contract]:
    return [
        Contract(ContractKey.parse(key), "TOY", Decimal(100), Decimal(qty), account)
        for key, qty in (("TOY 2031-01-17 C 100", 2), ("TOY 2031-01-17 P 90", -1))
    ]
