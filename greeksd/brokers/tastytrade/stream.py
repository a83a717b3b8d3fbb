"""The Tastytrade I/O shell: REST (positions, quote token) + one DXLink websocket.

One link at a time; per link a child nursery runs the reader, the keepalive timer and
the position refresher. A task that detects the end of the link (dead link, refused
token, closed socket) records why and cancels the link's nursery; `run` then waits
(`Reconnect`: backoff if the server answered, a cheap TCP probe every ~2 s while the
REST API or DXLink, whichever failed, is unreachable) and reconnects, fetching a fresh
quote token only when the old one was refused. The protocol work (parsing, decoding,
mapping to rows) lives in `protocol.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import trio
from tastytrade import API_URL
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection
from trio_websocket import open_websocket_url as _open_websocket_url

from greeksd.backoff import Address, Backoff, Reconnect, url_address
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.session import (
    Positions,
    QuoteToken,
    TastytradeApi,
    TastytradeApiError,
    TastytradeAuthError,
    Trades,
)
from greeksd.config import Settings
from greeksd.logs import get_logger, log_context
from greeksd.model import SnapshotSink, StreamState, StreamStatus

if TYPE_CHECKING:
    from greeksd.recording import Recorder

log = get_logger("greeksd.tastytrade.stream")

MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""Bursts of FEED_DATA exceed the 64 KiB limit the SDK keeps (and dies on, with 1009)."""
_MAX_CHANNEL_REOPENS = 3


class RestApi(Protocol):
    async def positions(self) -> Positions: ...

    async def quote_token(self) -> QuoteToken: ...

    async def trades(self) -> Trades: ...


class LinkFailure(Exception):
    """The current websocket is finished; reconnect after a backoff."""


class LinkDead(LinkFailure):
    """The server fell silent past the negotiated keepalive timeout (or never finished
    the handshake): the TCP connection may look healthy, the link is not."""


class TokenRefused(LinkFailure):
    """The server refused the quote token; the next attempt fetches a fresh one."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Link:
    """State of one websocket connection."""

    ws: WebSocketConnection
    timer: dx.KeepaliveTimer
    channel: int
    layouts: dict[str, tuple[str, ...]]
    nursery: trio.Nursery | None = None
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    channel_open: bool = False
    channel_reopens: int = 0
    subscribed: set[dx.Subscription] = field(default_factory=set)
    received_at: datetime = field(default_factory=_now)
    data_seen: bool = False
    failure: BaseException | None = None
    recorder: Recorder | None = None

    async def send(self, message: dx.Outgoing) -> None:
        async with self.send_lock:
            await self.ws.send_message(dx.build(message))
            self.timer.sent(trio.current_time())

    async def receive(self, status: StreamStatus) -> dx.Message:
        frame = await self.ws.get_message()
        self.received_at = status.last_message_at = datetime.now(UTC)
        self.timer.received(trio.current_time())
        if self.recorder is not None:
            self.recorder.frame("tastytrade", frame, self.received_at)
        return dx.parse(frame)


class TastytradeStream:
    """Source "tastytrade": Greeks of every open option position, as Snapshot rows."""

    name = "tastytrade"

    def __init__(
        self,
        api: TastytradeApi | Callable[[], AbstractAsyncContextManager[RestApi]],
        *,
        positions_refresh_s: float = 60.0,
        keepalive_timeout: float = 60.0,
        handshake_timeout: float = 15.0,
        aggregation_period: float = 0.1,
        channel: int = 1,
        backoff: Backoff | None = None,
        rest_url: str | None = None,
        probe_interval_s: float = 2.0,
        subscription_chunk_bytes: int = dx.SUBSCRIPTION_CHUNK_BYTES,
        recorder: Recorder | None = None,
    ) -> None:
        """`rest_url`: the REST API's base URL, probed while it is unreachable (None:
        REST failures only back off)."""
        if channel <= 0 or channel % 2 == 0:
            raise ValueError("DXLink feed channels must be odd and positive")
        self._open_api = api.open if isinstance(api, TastytradeApi) else api
        self._positions_refresh_s = positions_refresh_s
        self._keepalive_timeout = keepalive_timeout
        self._handshake_timeout = handshake_timeout
        self._aggregation_period = aggregation_period
        self._channel = channel
        self._backoff = backoff or Backoff()
        self._reconnect = Reconnect(self._backoff, probe_interval=probe_interval_s)
        self._rest_address = url_address(rest_url) if rest_url else None
        self._chunk_bytes = subscription_chunk_bytes
        self._mapper = dx.SnapshotMapper()
        self._wanted: set[dx.Subscription] = set()
        self.recorder = recorder  # `greeksd record`: frames, positions, new links

    @classmethod
    def from_settings(cls, settings: Settings) -> TastytradeStream:
        api = TastytradeApi(
            settings.tt_secret,
            settings.tt_refresh,
            account=settings.tt_account,
            api_url=settings.tt_api_url,
        )
        return cls(
            api,
            positions_refresh_s=settings.tt_positions_refresh_s,
            rest_url=settings.tt_api_url or API_URL,
        )

    # ------------------------------------------------------------------ outer loops

    async def run(self, sink: SnapshotSink, status: StreamStatus) -> None:
        with log_context(broker=self.name):
            while True:
                try:
                    async with self._open_api() as api:
                        await self._run_links(api, sink, status)
                except TastytradeAuthError as exc:
                    self._degrade(status, str(exc))
                await self._pause(status, None)  # it answered: a refused credential

    async def _run_links(self, api: RestApi, sink: SnapshotSink, status: StreamStatus) -> None:
        """Reconnect forever; only a refused OAuth credential escapes (to `run`)."""
        token: QuoteToken | None = None
        while True:
            status.set_state(StreamState.CONNECTING, now=_now())
            endpoint = self._rest_address  # the server the attempt is talking to
            try:
                await self._refresh_positions(api, status)
                await self._poll_trades(api, sink, status)
                if token is None:
                    token = await api.quote_token()
                    status.details["token_fetches"] = status.details.get("token_fetches", 0) + 1
                endpoint = url_address(token.dxlink_url)
                await self._run_link(api, token, sink, status)
            except TokenRefused as exc:
                token = None
                self._degrade(status, str(exc))
            except (LinkFailure, TastytradeApiError, HandshakeError, ConnectionClosed) as exc:
                self._degrade(status, _describe(exc))
            await self._pause(status, endpoint)

    async def _pause(self, status: StreamStatus, endpoint: Address | None) -> None:
        await self._reconnect.pause(status, endpoint)
        status.reconnects += 1

    def _degrade(self, status: StreamStatus, reason: str) -> None:
        log.warning("stream_degraded", reason=reason)
        status.last_error = reason
        status.set_state(StreamState.DEGRADED, reason, now=_now())

    # ------------------------------------------------------------------ one link

    async def _run_link(
        self, api: RestApi, token: QuoteToken, sink: SnapshotSink, status: StreamStatus
    ) -> None:
        async with _open_websocket_url(
            token.dxlink_url,
            max_message_size=MAX_MESSAGE_SIZE,
            connect_timeout=self._handshake_timeout,
            disconnect_timeout=1.0,
        ) as ws:
            now = trio.current_time()
            link = _Link(
                ws,
                dx.KeepaliveTimer(self._keepalive_timeout / 2, self._keepalive_timeout, now, now),
                self._channel,
                dx.field_layouts(dx.ACCEPT_EVENT_FIELDS, None),
                recorder=self.recorder,
            )
            if self.recorder is not None:
                self.recorder.link(self.name, _now(), channel=self._channel)
            async with trio.open_nursery() as nursery:
                link.nursery = nursery
                nursery.start_soon(self._guarded, link, self._serve(api, link, token, sink, status))
            if link.failure is not None:
                raise link.failure

    async def _guarded(self, link: _Link, work: Any) -> None:
        """Run one link task; an expected end of the link cancels its siblings instead of
        surfacing as an exception group."""
        try:
            await work
        except (LinkFailure, ConnectionClosed) as exc:
            if link.failure is None:
                link.failure = exc
            assert link.nursery is not None
            link.nursery.cancel_scope.cancel()

    async def _keepalive(self, link: _Link) -> None:
        """Started once the server's SETUP fixed the interval; until then the handshake
        timeout bounds the wait."""
        timer = link.timer
        while True:
            await trio.sleep_until(timer.next_deadline())
            now = trio.current_time()
            if timer.expired(now):
                raise LinkDead(f"no message from DXLink for {timer.receive_timeout:g}s")
            if timer.send_due(now):
                await link.send(dx.Keepalive())

    async def _serve(
        self,
        api: RestApi,
        link: _Link,
        token: QuoteToken,
        sink: SnapshotSink,
        status: StreamStatus,
    ) -> None:
        await link.send(
            dx.Setup(self._keepalive_timeout, self._keepalive_timeout, dx.CLIENT_VERSION)
        )
        await self._handshake(link, token, status)
        status.set_state(StreamState.CONNECTED, now=_now())
        log.info("dxlink_authorized", url=token.dxlink_url)
        await link.send(dx.ChannelRequest(link.channel))
        assert link.nursery is not None
        link.nursery.start_soon(self._guarded, link, self._refresher(api, link, sink, status))
        await self._read_loop(link, sink, status)

    async def _handshake(self, link: _Link, token: QuoteToken, status: StreamStatus) -> None:
        """AUTH only after the server's SETUP *and* AUTH_STATE UNAUTHORIZED (AUTH sent
        earlier is what produces the real server's "Session not found" failures)."""
        setup = unauthorized = auth_sent = False
        with trio.move_on_after(self._handshake_timeout):
            while True:
                message = await link.receive(status)
                match message:
                    case dx.Setup(keepalive_timeout=peer_timeout) if not setup:
                        setup = True
                        if peer_timeout:
                            link.timer.send_interval = max(peer_timeout / 2, 0.05)
                        assert link.nursery is not None
                        link.nursery.start_soon(self._guarded, link, self._keepalive(link))
                    case dx.AuthState(state="AUTHORIZED"):
                        return
                    case dx.AuthState(state="UNAUTHORIZED"):
                        if auth_sent:
                            raise TokenRefused("DXLink refused the quote token (UNAUTHORIZED)")
                        unauthorized = True
                    case _:
                        self._on_other(link, message, status)
                if setup and unauthorized and not auth_sent:
                    await link.send(dx.Auth(token.token))
                    auth_sent = True
        raise LinkDead(f"DXLink handshake incomplete after {self._handshake_timeout:g}s")

    async def _read_loop(self, link: _Link, sink: SnapshotSink, status: StreamStatus) -> None:
        put = sink.put
        while True:
            message = await link.receive(status)
            if message.__class__ is dx.FeedData:
                rows = self._on_data(link, message, status)  # type: ignore[arg-type]
                for row in rows:
                    put(row)
                continue
            match message:
                case dx.ChannelOpened(channel=channel) if channel == link.channel:
                    link.channel_open = True
                    await link.send(
                        dx.FeedSetup(
                            channel, dx.ACCEPT_EVENT_FIELDS, "COMPACT", self._aggregation_period
                        )
                    )
                    await self._sync_subscriptions(link, status, reset=True)
                case dx.FeedConfig(channel=channel) if channel == link.channel:
                    link.layouts = dx.field_layouts(dx.ACCEPT_EVENT_FIELDS, message)
                    if message.event_fields is None:
                        log.info("feed_config_without_fields", channel=channel)
                case dx.ChannelClosed(channel=channel) if channel == link.channel:
                    await self._reopen_channel(link, status)
                case dx.AuthState(state="UNAUTHORIZED"):
                    raise TokenRefused("DXLink revoked the session (AUTH_STATE UNAUTHORIZED)")
                case _:
                    self._on_other(link, message, status)

    def _on_data(self, link: _Link, message: dx.FeedData, status: StreamStatus) -> list[Any]:
        if message.channel != link.channel:
            self._reject(status, "unknown_channel", f"FEED_DATA on channel {message.channel}")
            return []
        events, problems = dx.decode_feed_data(message.data, link.layouts)
        rows, mapping_problems = self._mapper.map(events, link.received_at)
        status.ticks += len(rows)
        if problems or mapping_problems:
            for reason in (*problems, *mapping_problems):
                self._reject(status, "bad_event", reason)
        if not link.data_seen:
            link.data_seen = True
            self._backoff.reset()
        return rows

    def _on_other(self, link: _Link, message: dx.Message, status: StreamStatus) -> None:
        """Everything that is neither data nor the handshake: never fatal by itself,
        except a refused token."""
        match message:
            case dx.Keepalive() | dx.AuthState() | dx.Setup():
                pass
            case dx.Error(error=error, message=text):
                status.details["server_errors"] = status.details.get("server_errors", 0) + 1
                log.warning("dxlink_error", error=error, message=text)
                if error == "UNAUTHORIZED":
                    raise TokenRefused(f"DXLink ERROR UNAUTHORIZED: {text}")
            case dx.Malformed(reason=reason, excerpt=excerpt):
                self._reject(status, "malformed_frame", reason, excerpt=excerpt)
            case dx.ChannelClosed(channel=channel) | dx.ChannelOpened(channel=channel):
                self._reject(status, "unknown_channel", f"{type(message).__name__} {channel}")
            case _:
                self._reject(status, "unexpected_message", type(message).__name__)

    def _reject(self, status: StreamStatus, kind: str, reason: str, **extra: Any) -> None:
        status.rejected_frames += 1
        status.details[kind] = status.details.get(kind, 0) + 1
        log.warning("dxlink_rejected", kind=kind, reason=reason, **extra)

    async def _reopen_channel(self, link: _Link, status: StreamStatus) -> None:
        link.channel_open = False
        link.subscribed.clear()
        link.channel_reopens += 1
        status.details["channel_reopens"] = status.details.get("channel_reopens", 0) + 1
        if link.channel_reopens > _MAX_CHANNEL_REOPENS:
            raise LinkFailure(f"DXLink closed channel {link.channel} repeatedly")
        log.warning("dxlink_channel_closed", channel=link.channel, reopening=True)
        await link.send(dx.ChannelRequest(link.channel))

    # ------------------------------------------------------------------ positions

    async def _refresh_positions(self, api: RestApi, status: StreamStatus) -> None:
        positions = await api.positions()
        by_symbol = self._mapper.set_contracts(positions.contracts)
        if self.recorder is not None:
            self.recorder.positions(self.name, positions.contracts, _now())
        underlyings = {c.underlying for contracts in by_symbol.values() for c in contracts}
        self._wanted = {("Greeks", symbol) for symbol in by_symbol} | {
            (kind, u) for u in underlyings for kind in ("Quote", "Trade")
        }
        status.subscriptions = len(by_symbol)
        status.details["skipped_future_options"] = positions.skipped_future_options
        status.details["unparsable_positions"] = positions.skipped_unparsable

    async def _poll_trades(self, api: RestApi, sink: SnapshotSink, status: StreamStatus) -> None:
        """New fills into the sink; a fill seen on an earlier poll is put again and stored
        once (the trades table is idempotent on the transaction id). A failing poll only
        delays trades to the next refresh, so it never ends the link."""
        try:
            polled = await api.trades()
        except TastytradeApiError as exc:
            log.warning("trades_poll_failed", reason=str(exc))
            return
        details = status.details
        for reason in polled.rejected:
            log.warning("transaction_rejected", reason=reason)
        details["rejected_trades"] = details.get("rejected_trades", 0) + len(polled.rejected)
        for trade in polled.trades:
            sink.put_trade(trade)
        details["trades_polled"] = details.get("trades_polled", 0) + len(polled.trades)

    async def _refresher(
        self, api: RestApi, link: _Link, sink: SnapshotSink, status: StreamStatus
    ) -> None:
        """Follow opened/closed positions (and new fills); a failing refresh keeps the
        current set."""
        while True:
            await trio.sleep(self._positions_refresh_s)
            try:
                await self._refresh_positions(api, status)
                await self._poll_trades(api, sink, status)
            except TastytradeAuthError as exc:
                self._degrade(status, str(exc))
                continue
            except TastytradeApiError as exc:
                log.warning("positions_refresh_failed", reason=str(exc))
                continue
            if status.state is StreamState.DEGRADED:
                status.set_state(StreamState.CONNECTED, now=_now())
            if link.channel_open:
                await self._sync_subscriptions(link, status, reset=False)

    async def _sync_subscriptions(self, link: _Link, status: StreamStatus, *, reset: bool) -> None:
        wanted = set(self._wanted)
        add = sorted(wanted if reset else wanted - link.subscribed)
        remove = [] if reset else sorted(link.subscribed - wanted)
        for message in dx.chunk_subscription(
            link.channel, add=add, remove=remove, reset=reset, max_bytes=self._chunk_bytes
        ):
            await link.send(message)
        link.subscribed = wanted
        if add or remove:
            log.info("dxlink_subscriptions", added=len(add), removed=len(remove), reset=reset)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"DXLink connection closed: {exc.reason}"
    if isinstance(exc, HandshakeError):
        cause = exc.__cause__ or exc
        return f"DXLink connect failed: {type(cause).__name__}: {cause}"
    return str(exc)
