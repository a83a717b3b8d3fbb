"""A DXLink server on real sockets, driven by the synthetic market, that is as strict as
dxFeed's where the protocol notes say what the real server does.

It reads and writes the wire with its own code (`dxlink_wire`, never greeksd's client), so
a client that misreads the protocol is caught here rather than agreed with. It serves our
client and the tastytrade SDK's DXLinkStreamer alike: SETUP then AUTH_STATE UNAUTHORIZED,
odd channels only, FEED_CONFIG echoing the requested fields in the requested order,
COMPACT and FULL data with several events per array, `reset`, keepalives both ways and
ERROR TIMEOUT for a silent client.

What it refuses, with the ERROR it answers (every refusal is logged and kept in
`rejections`): not JSON / no string type / a server-only message / a wrong, missing or
unknown field / unknown event type or event field in `acceptEventFields` or a
subscription (BAD_ACTION); an unknown message type (UNSUPPORTED_PROTOCOL); anything but
SETUP before SETUP (BAD_ACTION); channel work before AUTHORIZED (UNAUTHORIZED); an even
channel (BAD_ACTION, the real server's message); FEED_SETUP, FEED_SUBSCRIPTION or
CHANNEL_CANCEL on a channel that is not open (BAD_ACTION). A message larger than
`max_message_bytes` closes the socket with 1009, as the real server does to huge
subscriptions.

Switches for what real servers do on their own (see "What the spec allows" in the notes):
`stalled`, `refuse_tokens`, `omit_event_fields`, `channel_refusal` ("error" or
"silent"), `auth_state_first`, `open_access` (no token needed: AUTH_STATE AUTHORIZED
without AUTH, as dxFeed's demo feed does), `integer_timeouts`, and the actions
`reorder_fields`
(FEED_CONFIG again, one event type, new order), `send_error`, `drop`, `close_channels`.
`greeks_withheld` (contract keys) stops the Greeks of those contracts while the
underlyings' Quote and Trade go on.
`sent_events` records every Greeks event that left the socket, so tests can compare
stored rows with it.

Futures options tick under dxFeed's symbols (`./EW3Z26C6025:XCME`), their futures' Quote
and Trade under `/ESZ26:XCME` (`greeksd.sim.symbols`).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from greeksd.logs import get_logger
from greeksd.sim import dxlink_wire as wire
from greeksd.sim.market import SyntheticMarket, Tick
from greeksd.sim.symbols import dxfeed_option, dxfeed_underlying

log = get_logger("greeksd.sim.dxlink")

#: The event types the simulator produces data for (others can be set up, never tick).
PRODUCED_TYPES = ("Quote", "Trade", "Greeks")


@dataclass(frozen=True, slots=True)
class SentGreeks:
    """One Greeks event as sent; `rho` is None where "NaN" went on the wire, and
    `underlying_price` is the mid of the underlying Quote sent in the same frame."""

    symbol: str
    contract_key: str
    time_ms: int
    index: int
    price: float
    volatility: float
    delta: float
    gamma: float
    theta: float
    rho: float | None
    vega: float
    underlying_price: float


@dataclass(frozen=True, slots=True)
class Rejection:
    """A client message the server refused (or a client it closed), for tests to read."""

    connection: int
    error: str
    reason: str
    excerpt: str = ""


@dataclass
class FeedChannel:
    data_format: str = "COMPACT"
    aggregation_period: float = 0.1
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subscriptions: set[tuple[str, str]] = field(default_factory=set)


@dataclass(slots=True)
class Liveness:
    """Both halves of keepalive: send something every `send_interval`; a client silent
    for `receive_timeout` gets ERROR TIMEOUT and is closed."""

    send_interval: float
    receive_timeout: float
    last_sent: float
    last_received: float

    def next_deadline(self) -> float:
        return min(self.last_sent + self.send_interval, self.last_received + self.receive_timeout)


@dataclass
class SimConnection:
    """Server-side state of one client, public so tests can inspect what it did.
    `received` holds every JSON object the client sent, valid or not."""

    id: int
    ws: WebSocketConnection
    liveness: Liveness
    setup_done: bool = False
    announced: bool = False  # AUTH_STATE already sent before SETUP
    authorized: bool = False
    channels: dict[int, FeedChannel] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)  # requested, never to be opened
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    closed_at: float | None = None
    retimed: trio.Event = field(default_factory=trio.Event)
    send_lock: trio.Lock = field(default_factory=trio.Lock)

    def received_of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, m) for at, m in self.received if m.get("type") == kind]


class DxLinkServer:
    def __init__(
        self,
        market: SyntheticMarket,
        *,
        token_valid: Callable[[str], bool],
        tick_interval: float = 0.05,
        events_per_frame: int = 3,
        keepalive_timeout: float = 60.0,
        nan_rho_rate: float = 0.1,
        max_message_bytes: int = 64 * 1024,
        seed: int = 11,
    ) -> None:
        self.market = market
        self._token_valid = token_valid
        self.tick_interval = tick_interval
        self.events_per_frame = events_per_frame
        self.keepalive_timeout = keepalive_timeout
        self.nan_rho_rate = nan_rho_rate
        self.max_message_bytes = max_message_bytes
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._last_time_ms = 0
        self.connections: dict[int, SimConnection] = {}
        self.closed_connections: list[SimConnection] = []
        self.sent_events: list[SentGreeks] = []
        self.rejections: list[Rejection] = []
        self.port = 0
        # switches: what real servers do on their own
        self.stalled = False
        self.refuse_tokens = False
        self.omit_event_fields = False
        self.channel_refusal: str | None = None
        self.auth_state_first = False
        self.open_access = False
        self.integer_timeouts = False
        self.greeks_withheld: set[str] = set()  # contract keys whose Greeks are not sent

    # ------------------------------------------------------------------ serving

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            serve = partial(serve_websocket, max_message_size=self.max_message_bytes)
            server = await nursery.start(serve, self._handle, host, port, None)
            self.port = server.port
            nursery.start_soon(self._tick_loop)
            task_status.started(self.port)

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        now = trio.current_time()
        timeout = self.keepalive_timeout
        conn = SimConnection(next(self._ids), ws, Liveness(timeout / 2, timeout, now, now))
        self.connections[conn.id] = conn
        log.info("sim_dxlink_connected", connection=conn.id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, conn)
                if self.auth_state_first:
                    conn.announced = True
                    conn.authorized = self.open_access
                    await self._send(conn, wire.auth_state(conn.authorized))
                await self._serve_client(conn)
                nursery.cancel_scope.cancel()
        finally:
            conn.closed_at = trio.current_time()
            self.connections.pop(conn.id, None)
            self.closed_connections.append(conn)
            log.info("sim_dxlink_disconnected", connection=conn.id)

    async def _serve_client(self, conn: SimConnection) -> None:
        while True:
            try:
                frame = await conn.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == 1009:
                    self._record(conn, "MESSAGE_TOO_BIG", exc.reason.reason or "1009", "")
                return
            now = trio.current_time()
            conn.liveness.last_received = now
            try:
                obj = wire.decode(frame)
            except wire.Violation as violation:
                await self._reject(conn, violation, frame)
                continue
            conn.received.append((now, obj))
            if self.stalled:
                continue
            try:
                await self._on_message(conn, wire.validate(obj))
            except wire.Violation as violation:
                await self._reject(conn, violation, frame)

    def _record(self, conn: SimConnection, error: str, reason: str, excerpt: str) -> None:
        self.rejections.append(Rejection(conn.id, error, reason, excerpt))
        log.warning(
            "sim_dxlink_rejected", connection=conn.id, error=error, reason=reason, frame=excerpt
        )

    async def _reject(
        self, conn: SimConnection, violation: wire.Violation, frame: str | bytes
    ) -> None:
        text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
        self._record(conn, violation.error, violation.reason, text[:200])
        await self._send(conn, wire.error(violation.error, violation.reason))

    async def _on_message(self, conn: SimConnection, message: wire.Inbound) -> None:
        kind, channel, body = message.kind, message.channel, message.body
        if kind != "SETUP" and not conn.setup_done:
            raise wire.Violation("BAD_ACTION", f"{kind} before SETUP")
        if kind == "SETUP":
            await self._on_setup(conn, body)
        elif kind == "KEEPALIVE":
            pass
        elif kind == "ERROR":
            log.info("sim_dxlink_client_error", connection=conn.id, error=body["error"])
        elif kind == "AUTH":
            conn.authorized = not self.refuse_tokens and self._token_valid(body["token"])
            if not conn.authorized:
                conn.channels.clear()
                conn.pending.clear()
            await self._send(conn, wire.auth_state(conn.authorized))
        elif not conn.authorized:
            raise wire.Violation("UNAUTHORIZED", f"{kind} before AUTHORIZED")
        elif kind == "CHANNEL_REQUEST":
            await self._on_channel_request(conn, channel, body)
        else:
            chan = conn.channels.get(channel)
            if chan is None:
                raise wire.Violation(
                    "BAD_ACTION", f"{kind} on channel {channel}, which is not open"
                )
            if kind == "CHANNEL_CANCEL":
                del conn.channels[channel]
                await self._send(conn, wire.channel_closed(channel))
            elif kind == "FEED_SETUP":
                await self._on_feed_setup(conn, channel, chan, body)
            else:
                self._on_subscription(chan, body)

    async def _on_setup(self, conn: SimConnection, body: Mapping[str, Any]) -> None:
        timeout = body.get("keepaliveTimeout")
        if timeout:  # the client waits this long for us: speak at least twice as often
            conn.liveness.send_interval = timeout / 2
            conn.retimed.set()
        first = not conn.setup_done
        conn.setup_done = True
        ours: float = self.keepalive_timeout
        if self.integer_timeouts:
            ours = round(ours)
        await self._send(conn, wire.setup(ours, ours))
        if first and not conn.announced:
            conn.authorized = self.open_access
            await self._send(conn, wire.auth_state(conn.authorized))

    async def _on_channel_request(
        self, conn: SimConnection, channel: int, body: Mapping[str, Any]
    ) -> None:
        if channel % 2 == 0:
            raise wire.Violation("BAD_ACTION", wire.EVEN_CHANNEL)
        if body["service"] != "FEED":
            raise wire.Violation("BAD_ACTION", f"unsupported service {body['service']!r:.40}")
        if self.channel_refusal == "error":
            log.info("sim_dxlink_channel_refused", connection=conn.id, channel=channel)
            await self._send(conn, wire.error("BAD_ACTION", f"channel {channel} refused"))
            return
        if self.channel_refusal == "silent":
            log.info("sim_dxlink_channel_never_opened", connection=conn.id, channel=channel)
            conn.pending.add(channel)
            return
        conn.channels[channel] = FeedChannel()
        await self._send(conn, wire.channel_opened(channel, body["parameters"]["contract"]))

    async def _on_feed_setup(
        self, conn: SimConnection, channel: int, chan: FeedChannel, body: Mapping[str, Any]
    ) -> None:
        chan.data_format = body.get("acceptDataFormat", chan.data_format)
        chan.aggregation_period = body.get("acceptAggregationPeriod") or chan.aggregation_period
        for event_type, names in (body.get("acceptEventFields") or {}).items():
            chan.fields[event_type] = tuple(names)
        echoed = None if self.omit_event_fields else chan.fields
        await self._send(
            conn, wire.feed_config(channel, chan.data_format, chan.aggregation_period, echoed)
        )

    @staticmethod
    def _on_subscription(chan: FeedChannel, body: Mapping[str, Any]) -> None:
        if body.get("reset"):
            chan.subscriptions.clear()
        chan.subscriptions.difference_update(
            (i["type"], i["symbol"]) for i in body.get("remove", ())
        )
        chan.subscriptions.update((i["type"], i["symbol"]) for i in body.get("add", ()))

    async def _keepalive(self, conn: SimConnection) -> None:
        """Close a silent client with ERROR TIMEOUT; fill our own silences with KEEPALIVE."""
        live = conn.liveness
        while True:
            with trio.move_on_at(live.next_deadline()):
                await conn.retimed.wait()
                conn.retimed = trio.Event()
                continue
            now = trio.current_time()
            if now >= live.last_received + live.receive_timeout:
                reason = f"no message from the client for {live.receive_timeout:g}s"
                self._record(conn, "TIMEOUT", reason, "")
                await self._send(conn, wire.error("TIMEOUT", reason), force=True)
                await conn.ws.aclose(1000, "keepalive timeout")
                return
            if now >= live.last_sent + live.send_interval:
                if self.stalled:
                    live.last_sent = now  # stay silent, but do not spin
                else:
                    await self._send(conn, wire.keepalive())

    async def _send(
        self, conn: SimConnection, message: Mapping[str, Any], *, force: bool = False
    ) -> None:
        await self._send_raw(conn, wire.encode(message), force=force)

    async def _send_raw(self, conn: SimConnection, frame: str, *, force: bool = False) -> None:
        if self.stalled and not force:
            return
        async with conn.send_lock:
            await self._write(conn, frame)

    @staticmethod
    async def _write(conn: SimConnection, frame: str) -> None:
        """Send with `conn.send_lock` held."""
        try:
            await conn.ws.send_message(frame)
        except ConnectionClosed:
            return
        conn.liveness.last_sent = trio.current_time()

    # ------------------------------------------------------------------ market data

    async def _tick_loop(self) -> None:
        while True:
            await trio.sleep(self.tick_interval)
            if self.stalled or not self.market.contracts:
                continue
            ticks = [self.market.next_tick() for _ in range(self.events_per_frame)]
            await self.publish(ticks)

    async def publish(self, ticks: list[Tick]) -> None:
        """Send one frame per channel carrying these ticks to every subscriber."""
        quotes: dict[str, dict[str, Any]] = {}
        greeks: list[tuple[Tick, dict[str, Any]]] = []
        for tick in ticks:
            time_ms = max(int(time.time() * 1000), self._last_time_ms + 1)
            self._last_time_ms = time_ms
            quotes[tick.contract.underlying] = self._quote(tick, time_ms)
            if str(tick.contract.key) not in self.greeks_withheld:
                greeks.append((tick, self._greeks(tick, time_ms)))
        events = {
            "Quote": list(quotes.values()),
            "Trade": [self._trade(q) for q in quotes.values()],
            "Greeks": [values for _, values in greeks],
        }
        delivered = await self._deliver(events)
        for tick, values in greeks:
            if values["eventSymbol"] in delivered:
                quote = quotes[tick.contract.underlying]
                self.sent_events.append(
                    SentGreeks(
                        values["eventSymbol"],
                        str(tick.contract.key),
                        values["time"],
                        values["index"],
                        values["price"],
                        values["volatility"],
                        values["delta"],
                        values["gamma"],
                        values["theta"],
                        None if values["rho"] == "NaN" else values["rho"],
                        values["vega"],
                        (quote["bidPrice"] + quote["askPrice"]) / 2,
                    )
                )

    async def _deliver(self, events: Mapping[str, list[dict[str, Any]]]) -> set[str]:
        """One FEED_DATA per channel with the events it subscribed, encoded by its
        current layout under the send lock (so a FEED_CONFIG and the data that follows
        it cannot cross). Returns the Greeks symbols that went out."""
        delivered: set[str] = set()
        for conn in list(self.connections.values()):
            if not conn.authorized or self.stalled:
                continue
            async with conn.send_lock:
                for channel, chan in list(conn.channels.items()):
                    subs = chan.subscriptions
                    wanted = {
                        t: [e for e in events.get(t, ()) if (t, e["eventSymbol"]) in subs]
                        for t in PRODUCED_TYPES
                    }
                    data = self._encode(chan, wanted)
                    if data:
                        await self._write(conn, wire.encode(wire.feed_data(channel, data)))
                        delivered.update(e["eventSymbol"] for e in wanted["Greeks"])
        return delivered

    @staticmethod
    def _encode(chan: FeedChannel, events: Mapping[str, list[dict[str, Any]]]) -> list[Any]:
        """Only the requested fields, in the requested order (unknown ones as null). In
        COMPACT a type without a requested layout is not sent (its order is unknowable);
        FULL sends such events whole."""
        if chan.data_format == "FULL":
            return wire.full(
                (t, chan.fields.get(t) or tuple(e for e in es[0] if e != "eventType"), es)
                for t, es in events.items()
                if es
            )
        return wire.compact((t, chan.fields[t], es) for t, es in events.items() if t in chan.fields)

    def _greeks(self, tick: Tick, time_ms: int) -> dict[str, Any]:
        g = tick.greeks
        nan_rho = self.nan_rho_rate > 0 and self._rng.random() < self.nan_rho_rate
        index = (time_ms // 1000) << 32 | (time_ms % 1000) << 22 | (tick.seq & 0x3FFFFF)
        return greeks_event(
            dxfeed_option(tick.contract),
            time_ms,
            index=index,
            price=g.price,
            volatility=g.implied_volatility,
            delta=g.delta,
            gamma=g.gamma,
            theta=g.theta,
            rho="NaN" if nan_rho else g.rho,
            vega=g.vega,
        )

    @staticmethod
    def _quote(tick: Tick, time_ms: int) -> dict[str, Any]:
        spot = tick.underlying_price
        return {
            "eventType": "Quote",
            "eventSymbol": dxfeed_underlying(tick.contract),
            "eventTime": 0,
            "sequence": 0,
            "timeNanoPart": 0,
            "bidTime": time_ms,
            "bidExchangeCode": "Q",
            "askTime": time_ms,
            "askExchangeCode": "Q",
            "bidPrice": round(spot - 0.01, 2),
            "askPrice": round(spot + 0.01, 2),
            "bidSize": 100.0,
            "askSize": 100.0,
        }

    @staticmethod
    def _trade(quote: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "eventType": "Trade",
            "eventSymbol": quote["eventSymbol"],
            "eventTime": 0,
            "time": quote["bidTime"],
            "sequence": 0,
            "price": (quote["bidPrice"] + quote["askPrice"]) / 2,
            "size": 1.0,
        }

    # ------------------------------------------------------------------ faults

    async def drop(self) -> None:
        """Close every client connection (the link drops; clients must reconnect)."""
        for conn in list(self.connections.values()):
            await conn.ws.aclose(1011, "simulated drop")

    def stall(self, on: bool = True) -> None:
        """Go silent (no data, no keepalives, no replies) while keeping sockets open."""
        self.stalled = on

    async def send_malformed(self, frame: str = '{"type":"FEED_DATA","channel":1,"data":[') -> None:
        for conn in list(self.connections.values()):
            await self._send_raw(conn, frame)

    async def send_frame(self, frame: str) -> None:
        """Send this exact frame to every authorized client."""
        for conn in list(self.connections.values()):
            if conn.authorized:
                await self._send_raw(conn, frame)

    async def inject_greeks(self, event: Mapping[str, Any], *, times: int = 1) -> None:
        """Send one Greeks event (built with `greeks_event`, any values: "NaN", an old
        time...) `times` times to every channel subscribed to its symbol, in each
        channel's own layout: the fixture generator's duplicates and late events. The
        copies go in one FEED_DATA, so no Quote can come between them and make the
        second row differ (its underlying price). Not recorded in `sent_events`."""
        await self._deliver({"Greeks": [dict(event) for _ in range(times)]})

    async def send_error(self, error: str = "UNKNOWN", message: str = "simulated error") -> None:
        """An ERROR to every client; the spec makes it informational (the link and the
        authorization stay as they are)."""
        for conn in list(self.connections.values()):
            await self._send(conn, wire.error(error, message))

    async def close_channels(self) -> None:
        """Close every open channel server-side, as the real server may do unprompted."""
        for conn in list(self.connections.values()):
            for channel in list(conn.channels):
                del conn.channels[channel]
                await self._send(conn, wire.channel_closed(channel))

    async def reorder_fields(self, event_type: str, order: Sequence[str] | None = None) -> int:
        """Send FEED_CONFIG again for `event_type` only, its fields in a new order
        (reversed unless `order` is given, which must permute them); data follows the
        new order from then on, so only a client that merges per event type keeps
        decoding right. Returns the number of channels changed."""
        changed = 0
        for conn in list(self.connections.values()):
            async with conn.send_lock:
                for channel, chan in list(conn.channels.items()):
                    current = chan.fields.get(event_type)
                    if current is None:
                        continue
                    new = tuple(order) if order is not None else current[::-1]
                    if sorted(new) != sorted(current):
                        raise ValueError(f"{new} is not a permutation of {current}")
                    chan.fields[event_type] = new
                    config = wire.feed_config(
                        channel, chan.data_format, chan.aggregation_period, {event_type: new}
                    )
                    await self._write(conn, wire.encode(config))
                    changed += 1
        log.info("sim_dxlink_fields_reordered", event_type=event_type, channels=changed)
        return changed

    def all_connections(self) -> list[SimConnection]:
        return [*self.closed_connections, *self.connections.values()]


def greeks_event(
    symbol: str,
    time_ms: int,
    *,
    price: Any,
    volatility: Any,
    delta: Any,
    gamma: Any,
    theta: Any,
    rho: Any,
    vega: Any,
    index: int = 0,
) -> dict[str, Any]:
    """A Greeks event with every field dxFeed defines for it; values are numbers or the
    strings "NaN" / "Infinity" / "-Infinity", as the server sends them."""
    return {
        "eventType": "Greeks",
        "eventSymbol": symbol,
        "eventTime": 0,
        "eventFlags": 0,
        "index": index,
        "time": time_ms,
        "sequence": 0,
        "price": price,
        "volatility": volatility,
        "delta": delta,
        "gamma": gamma,
        "theta": theta,
        "rho": rho,
        "vega": vega,
    }
