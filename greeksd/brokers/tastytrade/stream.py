"""The Tastytrade I/O shell: REST (positions, quote token) + one DXLink websocket.

One link at a time; per link a child nursery runs the reader, the timer task
(keepalives, silence watchdog, handshake and channel deadlines, from the link's first
moment) and the position refresher. A task that detects the end of the link (dead link,
refused token, closed socket) records why and cancels the link's nursery; `run` then
waits (`Reconnect`: backoff if the server answered, a cheap TCP probe every ~2 s while
the REST API or DXLink, whichever failed, is unreachable) and reconnects, fetching a
fresh quote token only when the old one was refused. The protocol's wire work (parsing,
decoding, mapping to rows) lives in `protocol.py`, its rules (what an AUTH_STATE or an
ERROR means, channel deadlines and retries, field layouts) in `connection.py`; this
module only reads, sends, sleeps and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import trio
from tastytrade import API_URL
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection
from trio_websocket import open_websocket_url as _open_websocket_url

from greeksd.backoff import Address, Backoff, Reconnect, url_address
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.connection import (
    CHANNEL_OPEN_TIMEOUT_S,
    AuthOutcome,
    ErrorKind,
    FeedChannel,
    LinkState,
)
from greeksd.brokers.tastytrade.session import (
    Positions,
    QuoteToken,
    TastytradeApi,
    TastytradeApiError,
    TastytradeAuthError,
    Trades,
)
from greeksd.brokers.tastytrade.spec import TastytradeSettings
from greeksd.logs import get_logger, log_context
from greeksd.model import Recorder, SnapshotSink, StreamState, StreamStatus

log = get_logger("greeksd.tastytrade.stream")

MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""Bursts of FEED_DATA exceed the 64 KiB limit the SDK keeps (and dies on, with 1009)."""


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
    """One websocket connection: its socket and its protocol state (`LinkState`)."""

    ws: WebSocketConnection
    state: LinkState
    token: QuoteToken
    nursery: trio.Nursery | None = None
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    subscribed: set[dx.Subscription] = field(default_factory=set)
    received_at: datetime = field(default_factory=_now)
    data_seen: bool = False
    failure: BaseException | None = None
    recorder: Recorder | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    """Set when the state may have moved a deadline, to wake the timer task."""

    async def send(self, message: dx.Outgoing) -> None:
        async with self.send_lock:
            await self.ws.send_message(dx.build(message))
            self.state.timer.sent(trio.current_time())

    async def receive(self, status: StreamStatus) -> dx.Message:
        frame = await self.ws.get_message()
        self.received_at = status.last_message_at = datetime.now(UTC)
        self.state.timer.received(trio.current_time())
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
        channel_open_timeout: float = CHANNEL_OPEN_TIMEOUT_S,
        recorder: Recorder | None = None,
    ) -> None:
        """`rest_url`: the REST API's base URL, probed while it is unreachable (None:
        REST failures only back off). `channel_open_timeout`: how long a CHANNEL_REQUEST
        may go unanswered before it counts as refused and is retried."""
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
        self._channel_open_timeout = channel_open_timeout
        self._mapper = dx.SnapshotMapper()
        self._wanted: set[dx.Subscription] = set()
        self.recorder = recorder  # `greeksd record`: frames, positions, new links

    @classmethod
    def from_settings(
        cls, settings: TastytradeSettings, recorder: Recorder | None
    ) -> TastytradeStream:
        api = TastytradeApi(
            settings.secret,
            settings.refresh,
            account=settings.account,
            api_url=settings.api_url,
        )
        return cls(
            api,
            positions_refresh_s=settings.positions_refresh_s,
            rest_url=settings.api_url or API_URL,
            recorder=recorder,
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
                    _count(status, "token_fetches")
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
            state = LinkState.start(
                trio.current_time(),
                keepalive_timeout=self._keepalive_timeout,
                handshake_timeout=self._handshake_timeout,
                feed=FeedChannel(
                    self._channel,
                    aggregation_period=self._aggregation_period,
                    open_timeout=self._channel_open_timeout,
                ),
            )
            link = _Link(ws, state, token, recorder=self.recorder)
            if self.recorder is not None:
                self.recorder.link(self.name, _now(), channel=self._channel)
            async with trio.open_nursery() as nursery:
                link.nursery = nursery
                # keepalives and the silence watchdog run from the link's first moment,
                # whatever the server announces first
                nursery.start_soon(self._guarded, link, self._timers(link, status))
                nursery.start_soon(self._guarded, link, self._serve(api, link, sink, status))
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

    async def _timers(self, link: _Link, status: StreamStatus) -> None:
        """Every deadline of the link: KEEPALIVE every half of the server's timeout,
        the inbound-silence watchdog, the handshake deadline, and the feed channel's
        open deadline and retries. Sleeps until the nearest one or until the read loop
        changed the state."""
        state = link.state
        timer, feed = state.timer, state.feed
        while True:
            with trio.move_on_at(state.next_deadline()):
                await link.changed.wait()
            link.changed = trio.Event()
            now = trio.current_time()
            if state.handshake.overdue(now):
                raise LinkDead(f"DXLink handshake incomplete after {self._handshake_timeout:g}s")
            if timer.expired(now):
                raise LinkDead(f"no message from DXLink for {timer.receive_timeout:g}s")
            if timer.send_due(now):
                await link.send(dx.Keepalive())
            problem = feed.expire(now)
            if problem is not None:
                _count(status, "channel_open_timeouts")
                self._channel_problem(feed, status, problem)
            request = feed.retry(now)
            if request is not None:
                _count(status, "channel_retries")
                log.info("dxlink_channel_retry", channel=feed.number, attempt=feed.retries)
                await link.send(request)

    async def _serve(
        self, api: RestApi, link: _Link, sink: SnapshotSink, status: StreamStatus
    ) -> None:
        await link.send(
            dx.Setup(self._keepalive_timeout, self._keepalive_timeout, dx.CLIENT_VERSION)
        )
        put = sink.put
        while True:
            message = await link.receive(status)
            if message.__class__ is dx.FeedData:
                rows = self._on_data(link, message, status)  # type: ignore[arg-type]
                for row in rows:
                    put(row)
                continue
            await self._on_control(api, link, message, sink, status)
            link.changed.set()

    async def _on_control(
        self,
        api: RestApi,
        link: _Link,
        message: dx.Message,
        sink: SnapshotSink,
        status: StreamStatus,
    ) -> None:
        """Everything but data: the rules are `LinkState`'s, the sending is here."""
        state = link.state
        feed = state.feed
        match message:
            case dx.Setup():
                state.on_setup(message)
            case dx.AuthState(state=auth_state):
                outcome = state.handshake.on_auth_state(auth_state)
                if outcome is AuthOutcome.REFUSED:
                    raise TokenRefused("DXLink refused the quote token (UNAUTHORIZED)")
                if outcome is AuthOutcome.REVOKED:
                    raise TokenRefused("DXLink revoked the session (AUTH_STATE UNAUTHORIZED)")
                if outcome is AuthOutcome.AUTHORIZED:
                    await self._authorized(api, link, sink, status)
            case dx.ChannelOpened(channel=channel) if channel == feed.number:
                setup, ended = feed.opened()
                await link.send(setup)
                await self._sync_subscriptions(link, status, reset=True)
                if ended is not None:
                    log.info("dxlink_channel_opened", channel=channel, after=ended)
                    if status.state is StreamState.DEGRADED and status.reason == ended:
                        status.set_state(StreamState.CONNECTED, now=_now())
            case dx.FeedConfig(channel=channel) if channel == feed.number:
                feed.feed_config(message)
                if message.event_fields is None:
                    log.info("feed_config_without_fields", channel=channel)
            case dx.ChannelClosed(channel=channel) if channel == feed.number:
                await self._reopen_channel(link, status)
            case dx.Error():
                self._on_error(link, message, status)
            case dx.Keepalive():
                pass
            case dx.Malformed(reason=reason, excerpt=excerpt):
                self._reject(status, "malformed_frame", reason, excerpt=excerpt)
            case dx.ChannelClosed(channel=channel) | dx.ChannelOpened(channel=channel):
                self._reject(status, "unknown_channel", f"{type(message).__name__} {channel}")
            case _:
                self._reject(status, "unexpected_message", type(message).__name__)
        if state.handshake.send_auth_now():
            await link.send(dx.Auth(link.token.token))

    async def _authorized(
        self, api: RestApi, link: _Link, sink: SnapshotSink, status: StreamStatus
    ) -> None:
        status.set_state(StreamState.CONNECTED, now=_now())
        log.info("dxlink_authorized", url=link.token.dxlink_url)
        await link.send(link.state.feed.request(trio.current_time()))
        assert link.nursery is not None
        link.nursery.start_soon(self._guarded, link, self._refresher(api, link, sink, status))

    def _on_data(self, link: _Link, message: dx.FeedData, status: StreamStatus) -> list[Any]:
        feed = link.state.feed
        if message.channel != feed.number:
            self._reject(status, "unknown_channel", f"FEED_DATA on channel {message.channel}")
            return []
        events, problems = dx.decode_feed_data(message.data, feed.layouts)
        mapper = self._mapper
        removed = mapper.removed_events
        rows, mapping_problems = mapper.map(events, link.received_at)
        status.ticks += len(rows)
        if mapper.removed_events != removed:
            status.details["removed_events"] = mapper.removed_events
        if problems or mapping_problems:
            for reason in (*problems, *mapping_problems):
                self._reject(status, "bad_event", reason)
        if not link.data_seen:
            link.data_seen = True
            self._backoff.reset()
        return rows

    def _on_error(self, link: _Link, error: dx.Error, status: StreamStatus) -> None:
        """An ERROR is logged and counted; `classify_error` says whether it means more."""
        _count(status, "server_errors")
        kind = link.state.classify(error)
        if kind is ErrorKind.TOKEN_REFUSED:
            raise TokenRefused(f"DXLink refused the quote token (ERROR: {error.message})")
        if kind is ErrorKind.CHANNEL_REFUSED:
            _count(status, "channel_refusals")
            problem = link.state.feed.refused(error, trio.current_time())
            self._channel_problem(link.state.feed, status, problem)
            return
        _count(status, "informational_errors")
        if kind is ErrorKind.TIMEOUT:
            # the server stopped hearing our keepalives and is closing the link; the
            # reconnect follows from the close
            log.warning("dxlink_error_timeout", message=error.message)
        else:
            log.warning("dxlink_error", error=error.error, message=error.message, acted=False)

    def _channel_problem(self, feed: FeedChannel, status: StreamStatus, problem: str) -> None:
        assert feed.deadline is not None
        log.warning(
            "dxlink_channel_unavailable",
            channel=feed.number,
            reason=problem,
            retry_in_s=round(feed.deadline - trio.current_time(), 2),
        )
        self._degrade(status, problem)

    def _reject(self, status: StreamStatus, kind: str, reason: str, **extra: Any) -> None:
        status.rejected_frames += 1
        _count(status, kind)
        log.warning("dxlink_rejected", kind=kind, reason=reason, **extra)

    async def _reopen_channel(self, link: _Link, status: StreamStatus) -> None:
        feed = link.state.feed
        link.subscribed.clear()
        _count(status, "channel_reopens")
        request = feed.closed(trio.current_time())
        if request is None:
            raise LinkFailure(f"DXLink closed channel {feed.number} repeatedly")
        log.warning("dxlink_channel_closed", channel=feed.number, reopening=True)
        await link.send(request)

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
            feed = link.state.feed
            if status.state is StreamState.DEGRADED and feed.problem is None:
                status.set_state(StreamState.CONNECTED, now=_now())
            if feed.is_open:
                await self._sync_subscriptions(link, status, reset=False)

    async def _sync_subscriptions(self, link: _Link, status: StreamStatus, *, reset: bool) -> None:
        wanted = set(self._wanted)
        add = sorted(wanted if reset else wanted - link.subscribed)
        remove = [] if reset else sorted(link.subscribed - wanted)
        for message in dx.chunk_subscription(
            link.state.feed.number,
            add=add,
            remove=remove,
            reset=reset,
            max_bytes=self._chunk_bytes,
        ):
            await link.send(message)
        link.subscribed = wanted
        if add or remove:
            log.info("dxlink_subscriptions", added=len(add), removed=len(remove), reset=reset)


def _count(status: StreamStatus, name: str) -> None:
    status.details[name] = status.details.get(name, 0) + 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"DXLink connection closed: {exc.reason}"
    if isinstance(exc, HandshakeError):
        cause = exc.__cause__ or exc
        return f"DXLink connect failed: {type(cause).__name__}: {cause}"
    return str(exc)
