"""One DXLink link's whole protocol, without I/O: `DxlinkConnection`.

Frames, REST answers and clock readings in; rows, frames to send, REST calls wanted and
the link's fate out (the event vocabulary of `greeksd.brokers.link`). It owns the
handshake (SETUP, AUTH only after the server's SETUP and AUTH_STATE), the feed channel
(request, deadline, refusal, retry with backoff, reopen, FEED_SETUP, per-event-type
field layouts), the subscriptions for the held positions (chunked add/remove/reset),
every deadline (keepalive, inbound-silence watchdog, handshake, channel, positions
refresh), ERROR classification, and the mapping of FEED_DATA and transactions to rows
and trades. The link runner (`link.py`), `greeksd replay` and the probe all drive this
one class, so every rule is testable with plain calls and lives in one place. The
real-server behaviours behind the rules are the ones the protocol notes list under
"What the spec allows that a tidy simulator would not do".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from greeksd.backoff import Backoff
from greeksd.brokers.link import (
    Call,
    CallFailed,
    Degraded,
    Event,
    LinkFailed,
    LinkUp,
    Note,
    Recovered,
    Rejected,
    Send,
    Tracked,
)
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.coverage import Coverage
from greeksd.model import Contract, ContractKey

CHANNEL_OPEN_TIMEOUT_S = 10.0
"""How long a CHANNEL_REQUEST may go unanswered before the channel counts as refused (a
server may never open it: without a deadline the link looks healthy and carries no data)."""
MAX_CHANNEL_REOPENS = 3
"""Unprompted CHANNEL_CLOSEDs answered on one link before the link itself is given up."""


class AuthOutcome(enum.Enum):
    NOTHING = "nothing"  # no change, or waiting for the other half of the handshake
    AUTHORIZED = "authorized"  # newly authorized: open the channel
    REFUSED = "refused"  # our AUTH was answered UNAUTHORIZED: the token is bad
    REVOKED = "revoked"  # UNAUTHORIZED after AUTHORIZED: the session is gone


@dataclass(slots=True)
class Handshake:
    """Channel 0's authorization, in whatever order the server announces things.

    AUTH goes out only after the server's SETUP *and* its AUTH_STATE UNAUTHORIZED (AUTH
    sent earlier is what produces the real server's "Session not found" failures), and
    the server may send either first. A server that announces AUTHORIZED needs no AUTH
    at all. An UNAUTHORIZED answering our AUTH is a refused token: the caller backs off
    and fetches a new one, never re-sends AUTH at once (the SDK's AUTH storm).
    """

    deadline: float
    """Until when the link may stay unauthorized (the handshake timeout)."""
    server_setup: bool = False
    unauthorized: bool = False
    auth_sent: bool = False
    authorized: bool = False

    def on_setup(self) -> None:
        self.server_setup = True

    def on_auth_state(self, state: str) -> AuthOutcome:
        if state == "AUTHORIZED":
            if self.authorized:
                return AuthOutcome.NOTHING
            self.authorized = True
            return AuthOutcome.AUTHORIZED
        if state != "UNAUTHORIZED":
            return AuthOutcome.NOTHING
        if self.authorized:
            self.authorized = False
            return AuthOutcome.REVOKED
        if self.auth_sent:
            return AuthOutcome.REFUSED
        self.unauthorized = True
        return AuthOutcome.NOTHING

    def send_auth_now(self) -> bool:
        """True exactly once, when AUTH should go out (and is then taken as sent)."""
        if self.server_setup and self.unauthorized and not (self.auth_sent or self.authorized):
            self.auth_sent = True
            return True
        return False

    def overdue(self, now: float) -> bool:
        return not self.authorized and now >= self.deadline

    def next_deadline(self) -> float:
        return math.inf if self.authorized else self.deadline


class ChannelPhase(enum.Enum):
    IDLE = "idle"  # never requested on this link
    REQUESTED = "requested"  # CHANNEL_REQUEST sent, no answer yet
    OPEN = "open"
    WAITING = "waiting"  # refused or unanswered: a retry is scheduled


def _channel_backoff() -> Backoff:
    return Backoff(initial=1.0, maximum=30.0)


@dataclass
class FeedChannel:
    """The one FEED channel of a link, and the field layouts its data follows.

    A CHANNEL_REQUEST answered by an ERROR, or not opened within `open_timeout`, is a
    problem (`problem` says which, for the stream's status) and is requested again on
    the same link after a jittered backoff (1 s doubling to 30 s): the link itself is
    healthy (keepalives flow) and reconnecting would only add a handshake, while a
    server that will not open channels for this session keeps answering the same.
    A CHANNEL_OPENED is accepted whenever it comes, even for a request we stopped
    waiting for. Layouts start from our request on every open and merge each
    FEED_CONFIG per event type.
    """

    number: int
    requested: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(dx.ACCEPT_EVENT_FIELDS)
    )
    aggregation_period: float = 0.1
    open_timeout: float = CHANNEL_OPEN_TIMEOUT_S
    backoff: Backoff = field(default_factory=_channel_backoff)
    phase: ChannelPhase = ChannelPhase.IDLE
    deadline: float | None = None
    problem: str | None = None
    reopens: int = 0
    retries: int = 0
    layouts: dict[str, tuple[str, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.layouts = dx.merge_feed_config(self.requested, None)

    @property
    def is_open(self) -> bool:
        return self.phase is ChannelPhase.OPEN

    @property
    def awaiting_answer(self) -> bool:
        return self.phase is ChannelPhase.REQUESTED

    def request(self, now: float) -> dx.ChannelRequest:
        self.phase = ChannelPhase.REQUESTED
        self.deadline = now + self.open_timeout
        return dx.ChannelRequest(self.number)

    def opened(self) -> tuple[dx.FeedSetup, str | None]:
        """CHANNEL_OPENED for our channel: the FEED_SETUP to send, and the problem this
        opening ends (None if there was none)."""
        ended, self.problem = self.problem, None
        self.phase = ChannelPhase.OPEN
        self.deadline = None
        self.backoff.reset()
        self.layouts = dx.merge_feed_config(self.requested, None)  # a new FEED_CONFIG follows
        return dx.FeedSetup(self.number, self.requested, "COMPACT", self.aggregation_period), ended

    def feed_config(self, config: dx.FeedConfig) -> None:
        self.layouts = dx.merge_feed_config(self.layouts, config)

    def closed(self, now: float) -> dx.ChannelRequest | None:
        """The server closed our channel unprompted: the request that reopens it, or None
        once it has done so more than `MAX_CHANNEL_REOPENS` times on this link."""
        self.reopens += 1
        if self.reopens > MAX_CHANNEL_REOPENS:
            return None
        return self.request(now)

    def refused(self, error: dx.Error, now: float) -> str:
        """An ERROR while our request is unanswered is its refusal; returns the problem."""
        text = f"({error.error}): {error.message}" if error.message else f"({error.error})"
        return self._wait(f"channel {self.number} refused {text}", now)

    def expire(self, now: float) -> str | None:
        """The problem, if an unanswered request has just passed its deadline."""
        if self.phase is ChannelPhase.REQUESTED and now >= self.next_deadline():
            return self._wait(
                f"channel {self.number} not opened within {self.open_timeout:g} s", now
            )
        return None

    def retry(self, now: float) -> dx.ChannelRequest | None:
        """The request to send again, if a scheduled retry is due."""
        if self.phase is ChannelPhase.WAITING and now >= self.next_deadline():
            self.retries += 1
            return self.request(now)
        return None

    def next_deadline(self) -> float:
        return math.inf if self.deadline is None else self.deadline

    def _wait(self, problem: str, now: float) -> str:
        self.problem = problem
        self.phase = ChannelPhase.WAITING
        self.deadline = now + self.backoff.next_delay()
        return problem


class ErrorKind(enum.Enum):
    INFORMATIONAL = "informational"  # log and count; nothing changes
    TIMEOUT = "timeout"  # we missed keepalives; the server is about to close the link
    TOKEN_REFUSED = "token_refused"  # ERROR UNAUTHORIZED answering our AUTH
    CHANNEL_REFUSED = "channel_refused"  # an ERROR while our CHANNEL_REQUEST is unanswered


def classify_error(error: dx.Error, handshake: Handshake, feed: FeedChannel) -> ErrorKind:
    """ERROR frames are informational unless the protocol gives them a meaning.

    `UNAUTHORIZED` after authorization means "not authorized for that action" (an
    entitlement), not a refused token: a refused token is AUTH_STATE UNAUTHORIZED after
    AUTH; only while our AUTH is unanswered is an ERROR UNAUTHORIZED its answer. An
    ERROR while our CHANNEL_REQUEST is unanswered is that request's refusal (the server
    answers it on channel 0). `TIMEOUT` says the server stopped hearing us; it closes
    the link itself, so the reconnect follows from that.
    """
    if error.error == "TIMEOUT":
        return ErrorKind.TIMEOUT
    if error.error == "UNAUTHORIZED" and handshake.auth_sent and not handshake.authorized:
        return ErrorKind.TOKEN_REFUSED
    if feed.awaiting_answer and error.channel in (0, feed.number):
        return ErrorKind.CHANNEL_REFUSED
    return ErrorKind.INFORMATIONAL


# ---- the Connection ----------------------------------------------------------------------
POSITIONS = Call("positions")
"""The REST call for the held positions (answered with a `protocol.Positions`)."""
TRADES = Call("trades")
"""The REST call for recent trade transactions (answered with their JSON objects)."""
OAUTH_REFUSED = "oauth_refused"
"""`CallFailed.kind` of a call Tastytrade refused our OAuth credentials for."""


@dataclass(frozen=True)
class DxlinkOptions:
    """How greeksd speaks DXLink: the same for every link of a stream."""

    channel: int = 1
    keepalive_timeout: float = 60.0
    """Announced in our SETUP; also how long a silent server is given."""
    handshake_timeout: float = 15.0
    """Until when the link may stay unauthorized (and the websocket connect timeout)."""
    aggregation_period: float = 0.1
    channel_open_timeout: float = CHANNEL_OPEN_TIMEOUT_S
    """How long a CHANNEL_REQUEST may go unanswered before it counts as refused."""
    positions_refresh_s: float = 60.0
    """Between the end of one positions refresh (and trades poll) and the next."""
    subscription_chunk_bytes: int = dx.SUBSCRIPTION_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.channel <= 0 or self.channel % 2 == 0:
            raise ValueError("DXLink feed channels must be odd and positive")


RejectKind = Literal["malformed_frame", "bad_event", "unknown_channel", "unexpected_message"]


@dataclass(slots=True)
class TastytradeCounters:
    """The Tastytrade stream's own counters and facts, across its links
    (`StreamStatus.counters`: the status JSON shows them flat, under these names)."""

    token_fetches: int = 0
    unparsable_positions: int = 0
    unsupported_positions: int = 0
    """Held positions not streamed (see `unsupported_reasons`)."""
    unsupported_reasons: dict[str, int] = field(default_factory=dict)
    """Why, by reason: e.g. a futures option whose instrument lookup failed."""
    trades_polled: int = 0
    rejected_trades: int = 0
    removed_events: int = 0
    """Greeks flagged REMOVE_EVENT: counted, never stored."""
    unknown_symbol_events: int = 0
    """Greeks for a streamer symbol no held contract maps to: counted, never stored."""
    server_errors: int = 0
    informational_errors: int = 0
    channel_refusals: int = 0
    channel_open_timeouts: int = 0
    channel_retries: int = 0
    channel_reopens: int = 0
    malformed_frame: int = 0
    bad_event: int = 0
    unknown_channel: int = 0
    unexpected_message: int = 0

    def rejected(self, kind: RejectKind) -> None:
        """One more rejection of this kind (every kind is a field of its own name)."""
        setattr(self, kind, getattr(self, kind) + 1)


_NOTHING: list[Event] = []
"""What a frame that changes nothing returns (shared: callers only iterate it)."""


class DxlinkConnection:
    """One DXLink link: see the module docstring. `mapper` (the held contracts and the
    underlyings' last prices) and `counters` outlive the link: the client hands the same
    ones to every link it opens, so a reconnect keeps both."""

    def __init__(
        self,
        token: str,
        options: DxlinkOptions | None = None,
        *,
        positions: dx.Positions | None = None,
        mapper: dx.SnapshotMapper | None = None,
        counters: TastytradeCounters | None = None,
        coverage: Coverage | None = None,
    ) -> None:
        """`positions`: what the client found before opening the link (tracked from
        `start`); None leaves the mapper's contracts as they are (replay). `coverage`:
        the status's tracker, fed with which held options' Greeks events arrive."""
        options = options or DxlinkOptions()
        self.options = options
        self.mapper = mapper if mapper is not None else dx.SnapshotMapper()
        self.counters = counters if counters is not None else TastytradeCounters()
        self.coverage = coverage if coverage is not None else Coverage("tastytrade")
        self.coverage.data = "feed data"
        self.timer = dx.KeepaliveTimer(
            options.keepalive_timeout / 2, options.keepalive_timeout, 0.0, 0.0
        )
        self.handshake = Handshake(options.handshake_timeout)
        self.feed = FeedChannel(
            options.channel,
            aggregation_period=options.aggregation_period,
            open_timeout=options.channel_open_timeout,
        )
        self.subscribed: set[dx.Subscription] = set()
        """What the open channel is subscribed to (empty until it opens)."""
        self.feed_frames = 0
        """FEED_DATA frames received on our channel (the probe reports it)."""
        self.feed_config_fields: bool | None = None
        """Whether the latest FEED_CONFIG stated field layouts (None: none came yet)."""
        self._token = token
        self._initial = positions
        self._wanted: set[dx.Subscription] = set()
        self._refresh_at = math.inf
        self._problem: str | None = None  # the reason of our last Degraded, until cleared

    # ---- the Connection protocol ---------------------------------------------------------
    def start(self, now: float, at: datetime) -> list[Event]:
        """Keepalive obligations and the handshake deadline start when the socket opens,
        whatever the server says first: until its SETUP states its timeout we speak every
        half of ours. The first trades poll goes out with it."""
        self.timer.sent(now)
        self.timer.received(now)
        self.handshake.deadline = now + self.options.handshake_timeout
        out = [] if self._initial is None else self._positions(self._initial, now)
        timeout = self.options.keepalive_timeout
        out.append(self._send(dx.Setup(timeout, timeout, dx.CLIENT_VERSION), now))
        out.append(TRADES)
        return out

    def receive(self, data: str | bytes, now: float, at: datetime) -> list[Event]:
        self.timer.received(now)
        message = dx.parse(data)
        if message.__class__ is dx.FeedData:
            return self._feed_data(message, at)  # type: ignore[arg-type]
        if message.__class__ is dx.Keepalive:
            return _NOTHING
        return self._control(message, now)

    def set_positions(
        self, positions: dx.Positions | Sequence[Contract], now: float, at: datetime
    ) -> list[Event]:
        """`positions` with their futures options' feed symbols (replay passes what a
        recording's positions record held), or bare contracts (equity options only)."""
        if isinstance(positions, dx.Positions):
            return self._track(positions.contracts, now, positions.feeds)
        return self._track(positions, now, {})

    def answer(self, call: Call, result: Any, now: float, at: datetime) -> list[Event]:
        if call == POSITIONS:
            return self._positions_answer(result, now)
        if call == TRADES:
            return self._trades_answer(result)
        raise ValueError(f"DxlinkConnection made no call {call!r}")

    def on_timer(self, now: float, at: datetime) -> list[Event]:
        if self.handshake.overdue(now):
            timeout = self.options.handshake_timeout
            return [LinkFailed(f"DXLink handshake incomplete after {timeout:g}s")]
        timer, feed = self.timer, self.feed
        if timer.expired(now):
            return [LinkFailed(f"no message from DXLink for {timer.receive_timeout:g}s")]
        out: list[Event] = []
        if timer.send_due(now):
            out.append(self._send(dx.Keepalive(), now))
        problem = feed.expire(now)
        if problem is not None:
            self.counters.channel_open_timeouts += 1
            out += self._channel_problem(problem, now)
        request = feed.retry(now)
        if request is not None:
            self.counters.channel_retries += 1
            out.append(
                Note("dxlink_channel_retry", {"channel": feed.number, "attempt": feed.retries})
            )
            out.append(self._send(request, now))
        if now >= self._refresh_at:
            self._refresh_at = math.inf  # the answer schedules the next one
            out.append(POSITIONS)
        return out

    def next_deadline(self) -> float:
        return min(
            self.timer.next_deadline(),
            self.handshake.next_deadline(),
            self.feed.next_deadline(),
            self._refresh_at,
        )

    # ---- frames --------------------------------------------------------------------------
    def _feed_data(self, message: dx.FeedData, at: datetime) -> list[Event]:
        """The hot path: rows straight from the mapper when nothing was wrong."""
        feed = self.feed
        if message.channel != feed.number:
            return [self._reject("unknown_channel", f"FEED_DATA on channel {message.channel}")]
        self.feed_frames += 1
        mapper = self.mapper
        rows, problems = mapper.feed_rows(message.data, feed.layouts, at)
        counters = self.counters
        counters.removed_events = mapper.removed_events
        counters.unknown_symbol_events = mapper.unknown_events
        update = self.coverage.update
        for row in rows:  # option rows come from Greeks events only: delta, mark (price)
            update(row.contract_key, at, row.delta is not None, row.mark is not None)
        if problems:
            out: list[Event] = [*rows]
            for reason in problems:
                out.append(self._reject("bad_event", reason))
            return out
        return cast(list[Event], rows)

    def _control(self, message: dx.Message, now: float) -> list[Event]:
        """Everything but data and keepalives."""
        handshake, feed = self.handshake, self.feed
        out: list[Event] = []
        match message:
            case dx.Setup():
                handshake.on_setup()
                if message.keepalive_timeout:  # speak at least twice per its timeout
                    self.timer.send_interval = max(message.keepalive_timeout / 2, 0.05)
            case dx.AuthState(state=state):
                outcome = handshake.on_auth_state(state)
                if outcome is AuthOutcome.REFUSED:
                    return [_token_refused("DXLink refused the quote token (UNAUTHORIZED)")]
                if outcome is AuthOutcome.REVOKED:
                    return [_token_refused("DXLink revoked the session (AUTH_STATE UNAUTHORIZED)")]
                if outcome is AuthOutcome.AUTHORIZED:
                    out += self._authorized(now)
            case dx.ChannelOpened(channel=channel) if channel == feed.number:
                out += self._opened(now)
            case dx.FeedConfig(channel=channel) if channel == feed.number:
                feed.feed_config(message)
                self.feed_config_fields = message.event_fields is not None
                if message.event_fields is None:
                    out.append(Note("feed_config_without_fields", {"channel": channel}))
            case dx.ChannelClosed(channel=channel) if channel == feed.number:
                out += self._closed(now)
            case dx.Error():
                out += self._error(message, now)
            case dx.Malformed(reason=reason, excerpt=excerpt):
                out.append(self._reject("malformed_frame", reason, excerpt))
            case dx.ChannelClosed(channel=channel) | dx.ChannelOpened(channel=channel):
                out.append(self._reject("unknown_channel", f"{type(message).__name__} {channel}"))
            case _:
                out.append(self._reject("unexpected_message", type(message).__name__))
        if handshake.send_auth_now():
            out.append(self._send(dx.Auth(self._token), now))
        return out

    def _authorized(self, now: float) -> list[Event]:
        """Authorized: the link is up, the channel is requested, refreshes begin."""
        self._refresh_at = now + self.options.positions_refresh_s
        return [
            LinkUp(),
            Note("dxlink_authorized", {"channel": self.feed.number}),
            self._send(self.feed.request(now), now),
        ]

    def _opened(self, now: float) -> list[Event]:
        """Our channel opened: FEED_SETUP, then every subscription afresh."""
        feed = self.feed
        setup, ended = feed.opened()
        out = [self._send(setup, now), *self._sync(now, reset=True)]
        if ended is not None:
            out.append(Note("dxlink_channel_opened", {"channel": feed.number, "after": ended}))
            if self._problem == ended:
                self._problem = None
                out.append(Recovered())
        return out

    def _closed(self, now: float) -> list[Event]:
        """The server closed our channel unprompted: reopen it (a few times per link)."""
        feed = self.feed
        self.subscribed = set()
        self.counters.channel_reopens += 1
        request = feed.closed(now)
        if request is None:
            return [LinkFailed(f"DXLink closed channel {feed.number} repeatedly")]
        note = Note("dxlink_channel_closed", {"channel": feed.number, "reopening": True}, "warning")
        return [note, self._send(request, now)]

    def _error(self, error: dx.Error, now: float) -> list[Event]:
        """Every ERROR is logged and counted; `classify_error` says whether it means
        more. A TIMEOUT needs nothing more: the server closes the link itself."""
        counters = self.counters
        counters.server_errors += 1
        kind = classify_error(error, self.handshake, self.feed)
        fields = {"error": error.error, "message": error.message, "meaning": kind.value}
        note = Note("dxlink_error", fields, "warning")
        if kind is ErrorKind.TOKEN_REFUSED:
            return [
                note,
                _token_refused(f"DXLink refused the quote token (ERROR: {error.message})"),
            ]
        if kind is ErrorKind.CHANNEL_REFUSED:
            counters.channel_refusals += 1
            return [note, *self._channel_problem(self.feed.refused(error, now), now)]
        counters.informational_errors += 1
        return [note]

    def _channel_problem(self, problem: str, now: float) -> list[Event]:
        retry_in = round(self.feed.next_deadline() - now, 2)
        fields = {"channel": self.feed.number, "reason": problem, "retry_in_s": retry_in}
        self._problem = problem
        return [Note("dxlink_channel_unavailable", fields, "warning"), Degraded(problem)]

    def _reject(self, kind: RejectKind, reason: str, excerpt: str = "") -> Rejected:
        self.counters.rejected(kind)
        return Rejected(kind, reason, excerpt)

    def _send(self, message: dx.Outgoing, now: float) -> Send:
        """Anything we send keeps the server's keepalive timeout at bay."""
        self.timer.sent(now)
        return Send(dx.build(message))

    # ---- positions, subscriptions, trades ------------------------------------------------
    def _positions(self, positions: dx.Positions, now: float) -> list[Event]:
        counters = self.counters
        counters.unparsable_positions = positions.skipped_unparsable
        counters.unsupported_reasons = dict(positions.unsupported)
        counters.unsupported_positions = sum(positions.unsupported.values())
        return self._track(positions.contracts, now, positions.feeds)

    def _track(
        self,
        contracts: Sequence[Contract],
        now: float,
        feeds: Mapping[ContractKey, dx.FeedSymbols],
    ) -> list[Event]:
        """Greeks of every held symbol, Quote and Trade of every underlying and future
        (their prices go into the rows); the open channel follows at once. A futures
        option without feed symbols cannot be subscribed: it is named in a warning."""
        mapper = self.mapper
        by_symbol = mapper.set_contracts(contracts, feeds)
        self.coverage.track((c.key_text, c) for c in contracts)
        self._wanted = {("Greeks", symbol) for symbol in by_symbol} | {
            (kind, u) for u in mapper.price_symbols() for kind in ("Quote", "Trade")
        }
        details = {"feeds": dx.feeds_json(feeds)} if feeds else {}
        out: list[Event] = [Tracked(contracts, len(by_symbol), details)]
        unfed = sorted(c.key_text for c in contracts if c.key.future and c.key not in feeds)
        if unfed:
            out.append(Note("future_options_without_feed", {"contracts": unfed}, "warning"))
        if self.feed.is_open:
            out += self._sync(now, reset=False)
        return out

    def _sync(self, now: float, *, reset: bool) -> list[Event]:
        """The FEED_SUBSCRIPTION messages that make the channel's subscriptions the
        wanted ones: all of them afresh (`reset`), or the difference."""
        wanted = self._wanted
        add = sorted(wanted if reset else wanted - self.subscribed)
        remove = [] if reset else sorted(self.subscribed - wanted)
        out: list[Event] = [
            self._send(message, now)
            for message in dx.chunk_subscription(
                self.feed.number,
                add=add,
                remove=remove,
                reset=reset,
                max_bytes=self.options.subscription_chunk_bytes,
            )
        ]
        self.subscribed = set(wanted)
        if add or remove:
            fields = {"added": len(add), "removed": len(remove), "reset": reset}
            out.append(Note("dxlink_subscriptions", fields))
        return out

    def _positions_answer(self, result: Any, now: float) -> list[Event]:
        """A refresh: follow opened and closed positions, then poll trades. A failing
        refresh keeps the current set; refused credentials also degrade the stream."""
        self._refresh_at = now + self.options.positions_refresh_s
        if isinstance(result, CallFailed):
            if result.kind == OAUTH_REFUSED:
                self._problem = result.reason
                return [Degraded(result.reason)]
            return [Note("positions_refresh_failed", {"reason": result.reason}, "warning")]
        out = self._positions(result, now)
        if self._problem is not None and self.feed.problem is None:
            self._problem = None
            out.append(Recovered())
        out.append(TRADES)
        return out

    def _trades_answer(self, result: Any) -> list[Event]:
        """New fills as trades; a fill seen on an earlier poll is put again and stored
        once (the trades table is idempotent on the transaction id). A failing poll only
        delays trades to the next refresh."""
        if isinstance(result, CallFailed):
            return [Note("trades_poll_failed", {"reason": result.reason}, "warning")]
        trades, rejected = dx.transaction_trades(result)
        counters = self.counters
        counters.trades_polled += len(trades)
        counters.rejected_trades += len(rejected)
        out: list[Event] = [
            Note("transaction_rejected", {"reason": reason}, "warning") for reason in rejected
        ]
        out += trades
        return out


def _token_refused(reason: str) -> LinkFailed:
    """The quote token is no good: the next link must fetch a fresh one (never re-send
    AUTH at once: the SDK's AUTH storm)."""
    return LinkFailed(reason, fresh_credentials=True)


def replaying() -> Callable[[Mapping[str, Any]], DxlinkConnection]:
    """Connections for a recording's links, made as the client makes them live: one
    mapper (held contracts, underlying prices) across every link, the channel number
    from the recording's `link` record."""
    mapper = dx.SnapshotMapper()

    def connect(link: Mapping[str, Any]) -> DxlinkConnection:
        return DxlinkConnection("", DxlinkOptions(int(link.get("channel", 1))), mapper=mapper)

    return connect
