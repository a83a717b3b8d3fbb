"""A protocol-faithful DXLink server on real sockets, driven by the synthetic market.

It behaves like dxFeed's server where greeksd (and the tastytrade SDK) depend on it:
SETUP then AUTH_STATE UNAUTHORIZED first, odd channels only, FEED_CONFIG echoing the
requested fields in the requested order (or omitting them, as the real server may),
COMPACT and FULL data with several events per array, `reset`, keepalives both ways and
ERROR TIMEOUT for a silent client. Fault switches let tests break it on purpose, and
`sent_events` records every Greeks event that left the socket, so tests can compare
stored rows with it.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from greeksd.brokers.tastytrade import protocol as dx
from greeksd.logs import get_logger
from greeksd.sim.market import SyntheticMarket, Tick

log = get_logger("greeksd.sim.dxlink")

_SUPPORTED_TYPES = frozenset({"Greeks", "Quote", "Trade"})


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


@dataclass
class _Channel:
    data_format: str = "COMPACT"
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subscriptions: set[dx.Subscription] = field(default_factory=set)


@dataclass
class SimConnection:
    """Server-side state of one client, public so tests can inspect what it did."""

    id: int
    ws: WebSocketConnection
    timer: dx.KeepaliveTimer
    authorized: bool = False
    channels: dict[int, _Channel] = field(default_factory=dict)
    received: list[tuple[float, dx.Message]] = field(default_factory=list)
    closed_at: float | None = None
    retimed: trio.Event = field(default_factory=trio.Event)
    send_lock: trio.Lock = field(default_factory=trio.Lock)

    def received_of(self, kind: type) -> list[tuple[float, Any]]:
        return [(at, m) for at, m in self.received if isinstance(m, kind)]


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
        seed: int = 11,
    ) -> None:
        self.market = market
        self._token_valid = token_valid
        self.tick_interval = tick_interval
        self.events_per_frame = events_per_frame
        self.keepalive_timeout = keepalive_timeout
        self.nan_rho_rate = nan_rho_rate
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._last_time_ms = 0
        self.connections: dict[int, SimConnection] = {}
        self.closed_connections: list[SimConnection] = []
        self.sent_events: list[SentGreeks] = []
        self.port = 0
        # fault switches
        self.stalled = False
        self.refuse_tokens = False
        self.omit_event_fields = False

    # ------------------------------------------------------------------ serving

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self._handle, host, port, None)
            self.port = server.port
            nursery.start_soon(self._tick_loop)
            task_status.started(self.port)

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        now = trio.current_time()
        conn = SimConnection(
            next(self._ids),
            ws,
            dx.KeepaliveTimer(30.0, self.keepalive_timeout, last_sent=now, last_received=now),
        )
        self.connections[conn.id] = conn
        log.info("sim_dxlink_connected", connection=conn.id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, conn)
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
            except ConnectionClosed:
                return
            now = trio.current_time()
            conn.timer.received(now)
            message = dx.parse(frame)
            conn.received.append((now, message))
            if self.stalled:
                continue
            await self._on_message(conn, message)

    async def _on_message(self, conn: SimConnection, message: dx.Message) -> None:
        match message:
            case dx.Setup(keepalive_timeout=timeout):
                if timeout:
                    conn.timer.send_interval = timeout / 2
                    conn.retimed.set()
                await self._send(
                    conn,
                    dx.Setup(self.keepalive_timeout, self.keepalive_timeout, dx.SERVER_VERSION),
                )
                await self._send(conn, dx.AuthState("UNAUTHORIZED"))
            case dx.Auth(token=token):
                conn.authorized = not self.refuse_tokens and self._token_valid(token)
                state = "AUTHORIZED" if conn.authorized else "UNAUTHORIZED"
                await self._send(conn, dx.AuthState(state, "sim-user" if conn.authorized else None))
            case dx.Keepalive():
                pass
            case dx.Malformed(reason=reason):
                await self._send(conn, dx.Error("BAD_ACTION", f"malformed message: {reason}"))
            case _ if not conn.authorized:
                await self._send(conn, dx.Error("UNAUTHORIZED", "authorize before using channels"))
            case dx.ChannelRequest(channel=channel, service=service, parameters=params):
                if channel % 2 == 0:
                    await self._send(
                        conn,
                        dx.Error("BAD_ACTION", "Protocol violation with an even channel usage."),
                    )
                elif service != "FEED":
                    await self._send(conn, dx.Error("BAD_ACTION", f"unsupported service {service}"))
                else:
                    conn.channels[channel] = _Channel()
                    opened = {"contract": params.get("contract", "AUTO"), "subFormat": "LIST"}
                    await self._send(conn, dx.ChannelOpened(channel, "FEED", opened))
            case dx.ChannelCancel(channel=channel):
                if conn.channels.pop(channel, None) is not None:
                    await self._send(conn, dx.ChannelClosed(channel))
            case dx.FeedSetup(channel=channel) if channel not in conn.channels:
                await self._send(conn, dx.Error("BAD_ACTION", f"channel {channel} is not open"))
            case dx.FeedSetup(
                channel=channel, event_fields=fields, data_format=fmt, aggregation_period=period
            ):
                chan = conn.channels[channel]
                chan.data_format = fmt if fmt in ("COMPACT", "FULL") else "COMPACT"
                chan.fields.update(fields or {})
                echoed = None if self.omit_event_fields else dict(chan.fields)
                await self._send(
                    conn, dx.FeedConfig(channel, chan.data_format, period or 0.1, echoed)
                )
            case dx.FeedSubscription(channel=channel) if channel not in conn.channels:
                await self._send(conn, dx.Error("BAD_ACTION", f"channel {channel} is not open"))
            case dx.FeedSubscription(channel=channel, add=add, remove=remove, reset=reset):
                subs = conn.channels[channel].subscriptions
                if reset:
                    subs.clear()
                subs.difference_update(remove)
                subs.update(s for s in add if s[0] in _SUPPORTED_TYPES)
            case _:
                await self._send(
                    conn, dx.Error("BAD_ACTION", f"unexpected {type(message).__name__}")
                )

    async def _keepalive(self, conn: SimConnection) -> None:
        """Close a silent client with ERROR TIMEOUT; fill our own silences with KEEPALIVE."""
        while True:
            with trio.move_on_at(conn.timer.next_deadline()):
                await conn.retimed.wait()
                conn.retimed = trio.Event()
                continue
            now = trio.current_time()
            if conn.timer.expired(now):
                await self._send(
                    conn, dx.Error("TIMEOUT", "no keepalive from the client"), force=True
                )
                await conn.ws.aclose(1000, "keepalive timeout")
                return
            if conn.timer.send_due(now):
                if self.stalled:
                    conn.timer.sent(now)  # stay silent, but do not spin
                else:
                    await self._send(conn, dx.Keepalive())

    async def _send(
        self, conn: SimConnection, message: dx.Outgoing, *, force: bool = False
    ) -> None:
        await self._send_raw(conn, dx.build(message), force=force)

    async def _send_raw(self, conn: SimConnection, frame: str, *, force: bool = False) -> None:
        if self.stalled and not force:
            return
        async with conn.send_lock:
            try:
                await conn.ws.send_message(frame)
            except ConnectionClosed:
                return
        conn.timer.sent(trio.current_time())

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
            quotes[tick.contract.underlying] = self._underlying_values(tick, time_ms)
            greeks.append((tick, self._greeks_values(tick, time_ms)))
        trades = {
            u: {
                "eventType": "Trade",
                "eventSymbol": u,
                "eventTime": 0,
                "time": q["bidTime"],
                "price": (q["bidPrice"] + q["askPrice"]) / 2,
                "size": 1,
            }
            for u, q in quotes.items()
        }
        delivered: set[str] = set()
        for conn in list(self.connections.values()):
            if not conn.authorized:
                continue
            for channel, state in list(conn.channels.items()):
                by_type: dict[str, list[dict[str, Any]]] = {"Quote": [], "Trade": [], "Greeks": []}
                subs = state.subscriptions
                by_type["Quote"] = [v for u, v in quotes.items() if ("Quote", u) in subs]
                by_type["Trade"] = [v for u, v in trades.items() if ("Trade", u) in subs]
                for _, values in greeks:
                    if ("Greeks", values["eventSymbol"]) in subs:
                        by_type["Greeks"].append(values)
                        delivered.add(values["eventSymbol"])
                data = self._encode(state, by_type)
                if data:
                    await self._send_raw(conn, dx.build(dx.FeedData(channel, data)))
        for tick, values in greeks:
            symbol = values["eventSymbol"]
            if symbol in delivered:
                quote = quotes[tick.contract.underlying]
                self.sent_events.append(
                    SentGreeks(
                        symbol,
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

    def _greeks_values(self, tick: Tick, time_ms: int) -> dict[str, Any]:
        g = tick.greeks
        nan_rho = self.nan_rho_rate > 0 and self._rng.random() < self.nan_rho_rate
        index = (time_ms // 1000) << 32 | (time_ms % 1000) << 22 | (tick.seq & 0x3FFFFF)
        return dx.greeks_event(
            dx.streamer_symbol(tick.contract.key),
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
    def _underlying_values(tick: Tick, time_ms: int) -> dict[str, Any]:
        spot = tick.underlying_price
        return {
            "eventType": "Quote",
            "eventSymbol": tick.contract.underlying,
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
    def _encode(state: _Channel, by_type: Mapping[str, list[dict[str, Any]]]) -> list[Any]:
        """Only the requested fields, in the requested order (unknown ones as null)."""
        if state.data_format == "FULL":
            return [
                {"eventType": t, **{f: e.get(f) for f in state.fields.get(t, e)}}
                for t, events in by_type.items()
                for e in events
            ]
        groups = [
            (t, [[e.get(f) for f in state.fields[t]] for e in events])
            for t, events in by_type.items()
            if events and t in state.fields
        ]
        return dx.compact_data(groups)

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
        """Send this exact frame to every authorized client: a repeated or late event, as
        the fixture generator injects them."""
        for conn in list(self.connections.values()):
            if conn.authorized:
                await self._send_raw(conn, frame)

    async def send_error(self, error: str = "UNKNOWN", message: str = "simulated error") -> None:
        for conn in list(self.connections.values()):
            await self._send(conn, dx.Error(error, message))

    async def close_channels(self) -> None:
        """Close every open channel server-side, as the real server may do unprompted."""
        for conn in list(self.connections.values()):
            for channel in list(conn.channels):
                del conn.channels[channel]
                await self._send(conn, dx.ChannelClosed(channel))

    def all_connections(self) -> list[SimConnection]:
        return [*self.closed_connections, *self.connections.values()]
