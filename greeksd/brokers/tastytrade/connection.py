"""What one DXLink link decides, without I/O: when to AUTH, what an AUTH_STATE or an
ERROR means, when keepalives and deadlines fall due, and the feed channel's life
(request, deadline, refusal, retry with backoff, per-event-type field layouts).

`TastytradeStream` (and `greeksd replay`, for the layouts) feeds this state the
messages it reads and the time it reads them at, and performs what it answers; nothing
here sends, sleeps or reads a clock, so every rule is testable with plain calls and
lives in one place. The real-server behaviours behind the rules are the ones the
protocol notes list under "What the spec allows that a tidy simulator would not do".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from greeksd.backoff import Backoff
from greeksd.brokers.tastytrade import protocol as dx

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


@dataclass
class LinkState:
    """Everything one link's rules need: liveness, authorization, the feed channel."""

    timer: dx.KeepaliveTimer
    handshake: Handshake
    feed: FeedChannel

    @classmethod
    def start(
        cls,
        now: float,
        *,
        keepalive_timeout: float,
        handshake_timeout: float,
        feed: FeedChannel,
    ) -> LinkState:
        """Keepalive obligations start when the link opens, whatever the server says
        first: until its SETUP states its timeout we speak every half of ours."""
        timer = dx.KeepaliveTimer(keepalive_timeout / 2, keepalive_timeout, now, now)
        return cls(timer, Handshake(now + handshake_timeout), feed)

    def on_setup(self, setup: dx.Setup) -> None:
        """The server's SETUP: speak at least twice per its announced timeout."""
        self.handshake.on_setup()
        if setup.keepalive_timeout:
            self.timer.send_interval = max(setup.keepalive_timeout / 2, 0.05)

    def classify(self, error: dx.Error) -> ErrorKind:
        return classify_error(error, self.handshake, self.feed)

    def next_deadline(self) -> float:
        return min(
            self.timer.next_deadline(),
            self.handshake.next_deadline(),
            self.feed.next_deadline(),
        )
