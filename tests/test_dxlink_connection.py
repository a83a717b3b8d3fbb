"""The DXLink Connection (`connection.py`) as plain calls: no socket, no clock.

First its parts (handshake, feed channel, ERROR classification), then transcripts of
the whole `DxlinkConnection`: frames, timer ticks and REST answers in, events out."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from greeksd.backoff import Backoff
from greeksd.brokers.link import (
    Call,
    CallFailed,
    Degraded,
    Event,
    LinkFailed,
    Note,
    Rejected,
    Send,
    Tracked,
)
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.connection import (
    OAUTH_REFUSED,
    POSITIONS,
    TRADES,
    AuthOutcome,
    ChannelPhase,
    DxlinkConnection,
    DxlinkOptions,
    ErrorKind,
    FeedChannel,
    Handshake,
    classify_error,
    replaying,
)
from greeksd.model import Broker, Contract, ContractKey, OptionRight, Snapshot, Trade
from greeksd.recording import contract_from_json, positions_record


def test_auth_goes_out_once_after_setup_and_unauthorized_in_either_order() -> None:
    for first, second in (("setup", "unauth"), ("unauth", "setup")):
        handshake = Handshake(deadline=15)
        for step in (first, second):
            assert not handshake.send_auth_now()
            if step == "setup":
                handshake.on_setup()
            else:
                assert handshake.on_auth_state("UNAUTHORIZED") is AuthOutcome.NOTHING
        assert handshake.send_auth_now() and not handshake.send_auth_now()
        assert handshake.on_auth_state("AUTHORIZED") is AuthOutcome.AUTHORIZED
        assert handshake.on_auth_state("AUTHORIZED") is AuthOutcome.NOTHING


def test_authorized_before_setup_needs_no_auth() -> None:
    handshake = Handshake(deadline=15)
    assert handshake.on_auth_state("AUTHORIZED") is AuthOutcome.AUTHORIZED
    handshake.on_setup()
    assert not handshake.send_auth_now()
    assert not handshake.overdue(100) and handshake.next_deadline() == math.inf


def test_unauthorized_answering_auth_is_a_refusal_and_after_authorized_a_revocation() -> None:
    handshake = Handshake(deadline=15)
    handshake.on_setup()
    handshake.on_auth_state("UNAUTHORIZED")
    assert handshake.send_auth_now()
    assert handshake.on_auth_state("UNAUTHORIZED") is AuthOutcome.REFUSED
    assert not handshake.send_auth_now()  # never an AUTH storm
    handshake = Handshake(deadline=15, auth_sent=True)
    handshake.on_auth_state("AUTHORIZED")
    assert handshake.on_auth_state("UNAUTHORIZED") is AuthOutcome.REVOKED


def test_handshake_deadline() -> None:
    handshake = Handshake(deadline=15)
    assert not handshake.overdue(14.9) and handshake.overdue(15)


def feed() -> FeedChannel:
    return FeedChannel(1, backoff=Backoff(initial=1.0, maximum=4.0, rng=random.Random(1)))


def test_unanswered_channel_request_expires_then_is_retried_with_backoff() -> None:
    channel = feed()
    assert channel.request(0) == dx.ChannelRequest(1)
    assert channel.deadline == 10 and channel.awaiting_answer
    assert channel.expire(9.9) is None and channel.retry(9.9) is None
    assert channel.expire(10) == "channel 1 not opened within 10 s"
    assert channel.phase is ChannelPhase.WAITING and channel.problem is not None
    assert 10.5 <= channel.next_deadline() <= 11  # first backoff: 0.5-1 s
    assert channel.retry(channel.next_deadline()) == dx.ChannelRequest(1)
    assert channel.retries == 1 and channel.awaiting_answer
    delays = []
    for _ in range(4):
        start = channel.next_deadline() - 10
        channel.expire(channel.next_deadline())
        delays.append(channel.next_deadline() - start - 10)
        channel.retry(channel.next_deadline())
    assert 1 <= delays[0] <= 2 and all(2 <= d <= 4 for d in delays[2:]), delays  # capped


def test_error_while_requested_is_a_refusal_and_opening_clears_it() -> None:
    channel = feed()
    handshake = Handshake(deadline=15, auth_sent=True, authorized=True)
    error = dx.Error("BAD_ACTION", "channel 1 refused")
    assert classify_error(error, handshake, channel) is ErrorKind.INFORMATIONAL  # not requested
    channel.request(0)
    assert classify_error(error, handshake, channel) is ErrorKind.CHANNEL_REFUSED
    assert channel.refused(error, 0.1) == "channel 1 refused (BAD_ACTION): channel 1 refused"
    assert classify_error(error, handshake, channel) is ErrorKind.INFORMATIONAL  # waiting
    setup, ended = channel.opened()  # a late CHANNEL_OPENED is accepted
    assert ended == "channel 1 refused (BAD_ACTION): channel 1 refused"
    assert setup == dx.FeedSetup(1, dx.ACCEPT_EVENT_FIELDS, "COMPACT", 0.1)
    assert channel.is_open and channel.problem is None and channel.next_deadline() == math.inf
    assert channel.opened()[1] is None
    assert channel.backoff.attempts == 0


def test_a_new_channel_starts_its_layouts_from_the_request() -> None:
    channel = feed()
    channel.request(0)
    channel.opened()
    channel.feed_config(dx.FeedConfig(1, "COMPACT", 0.1, {"Quote": ("askPrice", "eventSymbol")}))
    assert channel.layouts["Quote"] == ("askPrice", "eventSymbol")
    assert channel.layouts["Greeks"] == dx.GREEKS_FIELDS
    channel.closed(1)
    channel.opened()
    assert channel.layouts == dict(dx.ACCEPT_EVENT_FIELDS)


def test_repeated_channel_closes_give_up_the_link() -> None:
    channel = feed()
    for at in range(3):
        assert channel.closed(at) == dx.ChannelRequest(1)
        channel.opened()
    assert channel.closed(3) is None


@pytest.mark.parametrize(
    ("code", "auth_sent", "authorized", "requested", "kind"),
    [
        ("UNAUTHORIZED", True, True, False, ErrorKind.INFORMATIONAL),  # an entitlement
        ("UNAUTHORIZED", True, False, False, ErrorKind.TOKEN_REFUSED),  # answers our AUTH
        ("UNAUTHORIZED", False, False, False, ErrorKind.INFORMATIONAL),
        ("TIMEOUT", True, True, True, ErrorKind.TIMEOUT),
        ("BAD_ACTION", True, True, True, ErrorKind.CHANNEL_REFUSED),
        ("UNAUTHORIZED", True, True, True, ErrorKind.CHANNEL_REFUSED),
        ("UNKNOWN", True, True, False, ErrorKind.INFORMATIONAL),
    ],
)
def test_error_classification(
    code: str, auth_sent: bool, authorized: bool, requested: bool, kind: ErrorKind
) -> None:
    channel = feed()
    if requested:
        channel.request(0)
    handshake = Handshake(deadline=15, auth_sent=auth_sent, authorized=authorized)
    assert classify_error(dx.Error(code, "text"), handshake, channel) is kind


def test_error_on_another_channel_does_not_refuse_ours() -> None:
    channel = feed()
    channel.request(0)
    handshake = Handshake(deadline=15, authorized=True)
    assert classify_error(dx.Error("BAD_ACTION", "x", 5), handshake, channel) is (
        ErrorKind.INFORMATIONAL
    )


# ---- transcripts of the whole Connection -------------------------------------------------
AT = datetime(2026, 1, 5, 15, 30, tzinfo=UTC)
EXPIRY = date(2026, 6, 19)


def held(strike: int, underlying: str = "AAPL", account: str = "5WT1") -> Contract:
    key = ContractKey(underlying, EXPIRY, OptionRight.CALL, Decimal(strike))
    return Contract(key, underlying, Decimal(100), Decimal(2), account)


AAPL190, AAPL200, SPY500 = held(190), held(200), held(500, "SPY")


def symbol(contract: Contract) -> str:
    return dx.streamer_symbol(contract.key)


def frame(message: dx.Outgoing) -> str:
    """A server frame, as the server writes it."""
    return dx.build(message)


def wire(events: Sequence[Event]) -> list[dict[str, Any]]:
    """The frames among `events`, decoded."""
    return [orjson.loads(e.data) for e in events if isinstance(e, Send)]


def kinds(events: Sequence[Event]) -> list[str]:
    """A transcript's events in short: a frame by its message type, a call by its name,
    a note by its event, anything else by its class."""
    out = []
    for event in events:
        if isinstance(event, Send):
            out.append(orjson.loads(event.data)["type"])
        elif isinstance(event, Call):
            out.append(f"call {event.name}")
        elif isinstance(event, Note):
            out.append(f"note {event.event}")
        else:
            out.append(type(event).__name__)
    return out


def greeks(contract: Contract | str, time_ms: int, delta: Any = 0.5, **values: Any) -> list[Any]:
    """One Greeks event (of a contract, or a streamer symbol) as COMPACT values in our
    requested order."""
    name = contract if isinstance(contract, str) else symbol(contract)
    event = {"eventType": "Greeks", "eventSymbol": name, "eventTime": 0}
    event |= {"eventFlags": 0, "index": 0, "time": time_ms, "price": 5.0, "volatility": 0.3}
    event |= {"delta": delta, "gamma": 0.02, "theta": -0.05, "rho": 0.01, "vega": 0.2}
    event |= values
    return [event[name] for name in dx.GREEKS_FIELDS]


def feed_data(*groups: Any, channel: int = 1) -> str:
    return frame(dx.FeedData(channel, list(groups)))


LOOKUP_FAILED = "future option instrument lookup failed"


class Link:
    """One DxlinkConnection at a virtual time: each step returns its events."""

    def __init__(
        self,
        contracts: Sequence[Contract] = (AAPL190,),
        options: DxlinkOptions | None = None,
        feeds: dict[ContractKey, dx.FeedSymbols] | None = None,
        **kwargs: Any,
    ) -> None:
        positions = dx.Positions(list(contracts), 2, feeds or {}, {LOOKUP_FAILED: 1})
        self.conn = DxlinkConnection("tok", options, positions=positions, **kwargs)
        self.now = 100.0

    def at(self, now: float) -> Link:
        self.now = now
        return self

    def start(self) -> list[Event]:
        return self.conn.start(self.now, AT)

    def recv(self, data: str | dx.Outgoing) -> list[Event]:
        text = data if isinstance(data, str) else frame(data)
        return self.conn.receive(text, self.now, AT)

    def tick(self) -> list[Event]:
        return self.conn.on_timer(self.now, AT)

    def answer(self, call: Call, result: Any) -> list[Event]:
        return self.conn.answer(call, result, self.now, AT)

    def authorize(self) -> list[Event]:
        """start, the server's SETUP and AUTH_STATEs: returns the last step's events."""
        self.start()
        self.recv(dx.Setup(60, 60, "server"))
        self.recv(dx.AuthState("UNAUTHORIZED"))
        return self.recv(dx.AuthState("AUTHORIZED", "user"))

    def open(self) -> list[Event]:
        """Authorized, and the channel opened: returns the opening's events."""
        self.authorize()
        return self.recv(dx.ChannelOpened(1, "FEED", {"contract": "AUTO"}))


def test_start_tracks_the_positions_sends_setup_and_polls_trades() -> None:
    link = Link([AAPL190, SPY500])
    events = link.start()
    assert kinds(events) == ["Tracked", "SETUP", "call trades"]
    tracked = events[0]
    assert isinstance(tracked, Tracked)
    assert list(tracked.positions) == [AAPL190, SPY500] and tracked.subscriptions == 2
    assert wire(events) == [
        {
            "type": "SETUP",
            "channel": 0,
            "version": dx.CLIENT_VERSION,
            "keepaliveTimeout": 60,
            "acceptKeepaliveTimeout": 60,
        }
    ]
    counters = link.conn.counters
    assert (counters.unsupported_positions, counters.unparsable_positions) == (1, 2)
    assert counters.unsupported_reasons == {LOOKUP_FAILED: 1}


@pytest.mark.parametrize("setup_first", [True, False], ids=["setup-first", "auth-state-first"])
def test_auth_goes_out_once_the_server_sent_setup_and_unauthorized(setup_first: bool) -> None:
    link = Link()
    link.start()
    first: dx.Outgoing = dx.Setup(60, 60, "server")
    second: dx.Outgoing = dx.AuthState("UNAUTHORIZED")
    if not setup_first:
        first, second = second, first
    assert link.recv(first) == []
    events = link.recv(second)
    assert wire(events) == [{"type": "AUTH", "channel": 0, "token": "tok"}]
    assert link.recv(dx.Keepalive()) == []
    events = link.recv(dx.AuthState("AUTHORIZED", "user"))
    assert kinds(events) == ["LinkUp", "note dxlink_authorized", "CHANNEL_REQUEST"]
    assert wire(events)[0] == {
        "type": "CHANNEL_REQUEST",
        "channel": 1,
        "service": "FEED",
        "parameters": {"contract": "AUTO"},
    }


def test_a_server_that_needs_no_token_gets_no_auth() -> None:
    link = Link()
    link.start()
    events = link.recv(dx.AuthState("AUTHORIZED"))
    assert kinds(events) == ["LinkUp", "note dxlink_authorized", "CHANNEL_REQUEST"]
    assert link.recv(dx.Setup(60, 60, "server")) == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (dx.AuthState("UNAUTHORIZED"), "DXLink refused the quote token (UNAUTHORIZED)"),
        (
            dx.Error("UNAUTHORIZED", "bad token"),
            "DXLink refused the quote token (ERROR: bad token)",
        ),
    ],
    ids=["auth-state", "error"],
)
def test_a_refused_token_ends_the_link_asking_for_a_fresh_one(
    answer: dx.Outgoing, reason: str
) -> None:
    link = Link()
    link.start()
    link.recv(dx.Setup(60, 60, "server"))
    assert kinds(link.recv(dx.AuthState("UNAUTHORIZED"))) == ["AUTH"]
    events = link.recv(answer)
    assert events[-1] == LinkFailed(reason, fresh_credentials=True)
    assert "AUTH" not in kinds(events)  # never an AUTH storm


def test_unauthorized_after_authorized_is_a_revoked_session() -> None:
    link = Link()
    link.authorize()
    assert link.recv(dx.AuthState("UNAUTHORIZED")) == [
        LinkFailed("DXLink revoked the session (AUTH_STATE UNAUTHORIZED)", fresh_credentials=True)
    ]


def test_an_opened_channel_gets_feed_setup_and_every_subscription_afresh() -> None:
    link = Link([AAPL190, AAPL200, SPY500])
    events = link.open()
    assert kinds(events) == ["FEED_SETUP", "FEED_SUBSCRIPTION", "note dxlink_subscriptions"]
    setup, subscription = wire(events)
    assert setup == {
        "type": "FEED_SETUP",
        "channel": 1,
        "acceptAggregationPeriod": 0.1,
        "acceptDataFormat": "COMPACT",
        "acceptEventFields": {k: list(v) for k, v in dx.ACCEPT_EVENT_FIELDS.items()},
    }
    assert subscription["reset"] is True and "remove" not in subscription
    assert {(s["type"], s["symbol"]) for s in subscription["add"]} == {
        ("Greeks", symbol(AAPL190)),
        ("Greeks", symbol(AAPL200)),
        ("Greeks", symbol(SPY500)),
        ("Quote", "AAPL"),
        ("Trade", "AAPL"),
        ("Quote", "SPY"),
        ("Trade", "SPY"),
    }
    assert link.conn.subscribed == {(s["type"], s["symbol"]) for s in subscription["add"]}


def test_subscriptions_are_chunked() -> None:
    book = [held(100 + n) for n in range(40)]
    link = Link(book, DxlinkOptions(subscription_chunk_bytes=512))
    events = link.open()
    chunks = [m for m in wire(events) if m["type"] == "FEED_SUBSCRIPTION"]
    assert len(chunks) > 3 and all(len(orjson.dumps(m)) <= 600 for m in chunks)
    assert [bool(m.get("reset")) for m in chunks] == [True] + [False] * (len(chunks) - 1)
    assert sum(len(m["add"]) for m in chunks) == 42  # 40 Greeks, Quote and Trade of AAPL


def test_feed_data_becomes_rows_and_nothing_else() -> None:
    link = Link([AAPL190, held(190, account="5WT2")])
    link.open()
    quote = ["Quote", "AAPL", 10.0, 10.5]
    events = link.recv(feed_data("Quote", quote, "Greeks", greeks(AAPL190, 1_767_627_000_123)))
    assert [type(e) for e in events] == [Snapshot, Snapshot]  # one per account
    first = events[0]
    assert isinstance(first, Snapshot)
    assert (first.broker, first.contract_key, first.delta, first.mark) == (
        Broker.TASTYTRADE,
        str(AAPL190.key),
        0.5,
        5.0,
    )
    assert first.underlying_price == 10.25 and first.received_at == AT
    assert first.event_time == datetime(2026, 1, 5, 15, 30, 0, 123000, tzinfo=UTC)
    assert {e.account_id for e in events if isinstance(e, Snapshot)} == {"5WT1", "5WT2"}
    assert link.conn.feed_frames == 1
    assert link.recv(dx.Keepalive()) == []


def test_data_decodes_by_the_requested_order_when_feed_config_omits_fields() -> None:
    link = Link()
    link.open()
    assert kinds(link.recv(dx.FeedConfig(1, "COMPACT", 0.1, None))) == [
        "note feed_config_without_fields"
    ]
    (row,) = link.recv(feed_data("Greeks", greeks(AAPL190, 1, delta=0.125)))
    assert isinstance(row, Snapshot) and (row.delta, row.gamma) == (0.125, 0.02)
    assert link.conn.feed_config_fields is False


def test_feed_config_reorders_one_event_type_and_a_new_channel_starts_over() -> None:
    link = Link()
    link.open()
    reordered = tuple(reversed(dx.GREEKS_FIELDS))
    assert link.recv(dx.FeedConfig(1, "COMPACT", 0.1, {"Greeks": reordered})) == []
    values = list(reversed(greeks(AAPL190, 1_767_627_000_000, delta=0.25)))
    (row,) = link.recv(feed_data("Greeks", values))
    assert isinstance(row, Snapshot) and row.delta == 0.25
    link.recv(dx.FeedConfig(1, "COMPACT", 0.1, None))
    assert link.conn.feed.layouts["Greeks"] == reordered  # nothing stated, nothing changes
    link.recv(dx.ChannelClosed(1))
    link.recv(dx.ChannelOpened(1))
    assert link.conn.feed.layouts["Greeks"] == dx.GREEKS_FIELDS


def test_unusable_frames_are_rejected_counted_and_the_rest_kept() -> None:
    link = Link()
    link.open()
    bad_group = feed_data("Greeks", greeks(AAPL190, 1)[:-1], "Greeks", greeks(AAPL190, 2))
    events = link.recv(bad_group)
    assert [type(e) for e in events] == [Snapshot, Rejected]
    assert isinstance(events[1], Rejected) and events[1].kind == "bad_event"
    (other,) = link.recv(feed_data("Greeks", greeks(AAPL190, 4), channel=7))
    assert other == Rejected("unknown_channel", "FEED_DATA on channel 7")
    (malformed,) = link.recv('{"type":"FEED_DATA",')
    assert isinstance(malformed, Rejected) and malformed.kind == "malformed_frame"
    assert malformed.excerpt == '{"type":"FEED_DATA",'
    assert link.recv(dx.ChannelOpened(5)) == [Rejected("unknown_channel", "ChannelOpened 5")]
    assert link.recv(dx.Auth("x")) == [Rejected("unexpected_message", "Auth")]
    counters = link.conn.counters
    assert (counters.bad_event, counters.unknown_channel) == (1, 2)
    assert (counters.malformed_frame, counters.unexpected_message) == (1, 1)


def test_bad_values_are_reported_and_stored_as_none() -> None:
    link = Link()
    link.open()
    events = link.recv(feed_data("Greeks", greeks(AAPL190, 1, delta="bad")))
    assert [type(e) for e in events] == [Snapshot, Rejected]
    row = events[0]
    assert isinstance(row, Snapshot) and row.delta is None and row.gamma == 0.02


def test_removal_events_are_counted_not_stored() -> None:
    link = Link()
    link.open()
    removal = greeks(AAPL190, 1, eventFlags=dx.REMOVE_EVENT)
    assert link.recv(feed_data("Greeks", removal)) == []
    assert link.conn.counters.removed_events == 1


def test_keepalives_follow_the_server_timeout_and_any_frame_sent_counts() -> None:
    link = Link()
    link.start()
    assert link.conn.next_deadline() == 115  # the handshake deadline comes first
    link.recv(dx.Setup(10, 10, "server"))  # speak every 5 s from now on
    assert link.conn.next_deadline() == 105
    assert link.at(104.9).tick() == []
    assert kinds(link.at(105).tick()) == ["KEEPALIVE"]
    assert link.conn.next_deadline() == 110
    link.at(107).recv(dx.AuthState("UNAUTHORIZED"))  # our AUTH goes out at 107
    assert link.conn.next_deadline() == 112
    link.recv(dx.Setup(None, None, "server"))  # a SETUP without a timeout changes nothing
    assert link.conn.timer.send_interval == 5


def test_a_silent_server_ends_the_link() -> None:
    link = Link(options=DxlinkOptions(positions_refresh_s=1000))
    link.open()  # everything sent and received at 100
    link.at(150).recv(dx.Keepalive())
    assert link.conn.next_deadline() == 130  # our keepalive (every 30 s of our 60)
    for now in (130, 160, 190):
        assert kinds(link.at(now).tick()) == ["KEEPALIVE"]
    assert link.conn.next_deadline() == 210  # 60 s after the server's last word
    assert link.at(210).tick() == [LinkFailed("no message from DXLink for 60s")]


def test_an_unfinished_handshake_ends_the_link() -> None:
    link = Link(options=DxlinkOptions(handshake_timeout=5))
    link.start()
    link.recv(dx.Setup(60, 60, "server"))
    link.recv(dx.AuthState("UNAUTHORIZED"))
    assert link.at(104.9).tick() == []
    assert link.at(105).tick() == [LinkFailed("DXLink handshake incomplete after 5s")]


def test_an_unanswered_channel_request_degrades_is_retried_and_recovers_when_opened() -> None:
    link = Link()
    link.authorize()  # CHANNEL_REQUEST at 100
    assert link.conn.next_deadline() == 110
    events = link.at(110).tick()
    reason = "channel 1 not opened within 10 s"
    assert kinds(events) == ["note dxlink_channel_unavailable", "Degraded"]
    assert events[-1] == Degraded(reason)
    retry_at = link.conn.next_deadline()
    assert 110.5 <= retry_at <= 111
    assert kinds(link.at(retry_at).tick()) == ["note dxlink_channel_retry", "CHANNEL_REQUEST"]
    events = link.recv(dx.ChannelOpened(1))  # the retry's answer
    assert kinds(events)[-2:] == ["note dxlink_channel_opened", "Recovered"]
    counters = link.conn.counters
    assert (counters.channel_open_timeouts, counters.channel_retries) == (1, 1)


def test_an_error_answering_the_channel_request_is_its_refusal() -> None:
    link = Link()
    link.authorize()
    events = link.at(101).recv(dx.Error("BAD_ACTION", "channel 1 refused"))
    reason = "channel 1 refused (BAD_ACTION): channel 1 refused"
    assert kinds(events) == ["note dxlink_error", "note dxlink_channel_unavailable", "Degraded"]
    assert events[-1] == Degraded(reason)
    assert 101.5 <= link.conn.next_deadline() <= 102
    assert link.conn.counters.channel_refusals == 1


@pytest.mark.parametrize("code", ["UNAUTHORIZED", "TIMEOUT", "UNKNOWN"])
def test_an_informational_error_is_logged_and_counted_only(code: str) -> None:
    link = Link()
    link.open()
    (note,) = link.recv(dx.Error(code, "text"))
    assert isinstance(note, Note) and note.event == "dxlink_error" and note.level == "warning"
    counters = link.conn.counters
    assert (counters.server_errors, counters.informational_errors) == (1, 1)


def test_a_closed_channel_is_reopened_a_few_times_then_the_link_given_up() -> None:
    link = Link()
    link.open()
    for _ in range(3):
        events = link.recv(dx.ChannelClosed(1))
        assert kinds(events) == ["note dxlink_channel_closed", "CHANNEL_REQUEST"]
        assert link.conn.subscribed == set()
        assert "FEED_SUBSCRIPTION" in kinds(link.recv(dx.ChannelOpened(1)))
    assert link.recv(dx.ChannelClosed(1)) == [LinkFailed("DXLink closed channel 1 repeatedly")]
    assert link.conn.counters.channel_reopens == 4


def test_positions_refresh_follows_opened_and_closed_positions_then_polls_trades() -> None:
    link = Link([AAPL190, AAPL200], DxlinkOptions(positions_refresh_s=45))
    link.open()  # authorized at 100
    assert link.conn.next_deadline() == 130  # a keepalive first
    assert kinds(link.at(130).tick()) == ["KEEPALIVE"]
    assert link.conn.next_deadline() == 145
    assert link.at(145).tick() == [POSITIONS]
    assert link.at(146).tick() == []  # one refresh at a time
    events = link.answer(POSITIONS, dx.Positions([AAPL190, SPY500]))
    assert kinds(events) == [
        "Tracked",
        "FEED_SUBSCRIPTION",
        "FEED_SUBSCRIPTION",
        "note dxlink_subscriptions",
        "call trades",
    ]
    remove, add = wire(events)
    assert remove["remove"] == [{"type": "Greeks", "symbol": symbol(AAPL200)}]
    assert {(s["type"], s["symbol"]) for s in add["add"]} == {
        ("Greeks", symbol(SPY500)),
        ("Quote", "SPY"),
        ("Trade", "SPY"),
    }
    link.at(150).recv(dx.Keepalive())
    assert link.conn.next_deadline() == 176  # a keepalive, 30 s after our last frame
    assert kinds(link.at(176).tick()) == ["KEEPALIVE"]
    assert link.conn.next_deadline() == 191  # the next refresh, 45 s after the answer
    assert link.at(191).tick() == [POSITIONS]


def test_a_refresh_refused_for_credentials_degrades_until_one_succeeds() -> None:
    link = Link()
    link.open()
    refused = CallFailed("Tastytrade refused the OAuth credentials (HTTP 401)", OAUTH_REFUSED)
    assert link.answer(POSITIONS, refused) == [Degraded(refused.reason)]
    assert kinds(link.answer(POSITIONS, CallFailed("HTTP 503"))) == [
        "note positions_refresh_failed"
    ]
    events = link.answer(POSITIONS, dx.Positions([AAPL190]))
    assert kinds(events) == ["Tracked", "Recovered", "call trades"]  # nothing to subscribe


def test_a_refresh_does_not_paper_over_a_channel_problem() -> None:
    link = Link()
    link.authorize()
    link.at(110).tick()  # the channel request expired: degraded
    events = link.answer(POSITIONS, dx.Positions([AAPL190]))
    assert "Recovered" not in kinds(events)
    assert "FEED_SUBSCRIPTION" not in kinds(events)  # the channel is not open


def transaction(**changes: Any) -> dict[str, Any]:
    tx = {
        "id": 42,
        "account-number": "5WT1",
        "transaction-type": "Trade",
        "symbol": "AAPL  260619C00190000",
        "underlying-symbol": "AAPL",
        "instrument-type": "Equity Option",
        "action": "Sell to Open",
        "quantity": "3.0",
        "price": "2.5",
        "executed-at": "2026-01-05T15:30:00.250Z",
    }
    return {k: v for k, v in (tx | changes).items() if v is not None}


def test_polled_transactions_become_trades_and_bad_ones_are_counted() -> None:
    link = Link()
    link.start()
    answer = [
        transaction(),
        transaction(id=43, action="Buy to Close", symbol="SPY", **{"instrument-type": "Equity"}),
        transaction(id=44, **{"transaction-type": "Money Movement"}),
        transaction(id=45, quantity="0"),
        transaction(id=46, action=None),
    ]
    events = link.answer(TRADES, answer)
    assert kinds(events) == [
        "note transaction_rejected",
        "note transaction_rejected",
        "Trade",
        "Trade",
    ]
    sold, bought = (e for e in events if isinstance(e, Trade))
    assert sold == Trade(
        Broker.TASTYTRADE,
        "42",
        "5WT1",
        str(AAPL190.key),
        "AAPL  260619C00190000",
        "sell",
        Decimal(3),
        Decimal("2.5"),
        datetime(2026, 1, 5, 15, 30, 0, 250000, tzinfo=UTC),
        source_payload=answer[0],
    )
    assert (bought.side, bought.contract_key, bought.symbol) == ("buy", None, "SPY")
    counters = link.conn.counters
    assert (counters.trades_polled, counters.rejected_trades) == (2, 2)
    assert kinds(link.answer(TRADES, CallFailed("HTTP 500"))) == ["note trades_poll_failed"]


def test_replayed_links_share_one_mapper_as_live_links_do() -> None:
    """A recording: positions (before the first link), a link, a quote, a reconnect: the
    second link's rows still carry the contracts and the underlying price."""
    connect = replaying()
    first = connect({})
    first.set_positions([AAPL190], 0, AT)
    link = connect({"channel": 1})
    link.start(1, AT)
    link.receive(feed_data("Quote", ["Quote", "AAPL", 10.0, 11.0]), 2, AT)
    again = connect({"channel": 3})
    again.start(3, AT)
    (row,) = again.receive(feed_data("Greeks", greeks(AAPL190, 5), channel=3), 4, AT)
    assert isinstance(row, Snapshot) and row.underlying_price == 10.5


def test_set_positions_follows_on_the_open_channel() -> None:
    link = Link()
    link.open()
    events = link.conn.set_positions([AAPL190, AAPL200], link.now, AT)
    assert kinds(events) == ["Tracked", "FEED_SUBSCRIPTION", "note dxlink_subscriptions"]
    assert wire(events)[0]["add"] == [{"type": "Greeks", "symbol": symbol(AAPL200)}]


# A futures option as the session hands it over: the key from its position symbol
# ('./ESZ5 EW3Z5 251219C6000'), its and its future's streamer symbols from the API.
ES_FOP = Contract(
    ContractKey.parse("/ESZ25 EW3 2025-12-19 C 6000"), "ES", Decimal(50), Decimal(-1), "5WT1"
)
ES_FEED = dx.FeedSymbols("./EW3Z25C6000:XCME", "/ESZ25:XCME")


def test_futures_options_stream_by_their_api_symbols_with_their_futures_price() -> None:
    link = Link([AAPL190, ES_FOP], feeds={ES_FOP.key: ES_FEED})
    events = link.open()
    (subscription,) = [m for m in wire(events) if m["type"] == "FEED_SUBSCRIPTION"]
    assert {(s["type"], s["symbol"]) for s in subscription["add"]} == {
        ("Greeks", symbol(AAPL190)),
        ("Quote", "AAPL"),
        ("Trade", "AAPL"),
        ("Greeks", "./EW3Z25C6000:XCME"),
        ("Quote", "/ESZ25:XCME"),
        ("Trade", "/ESZ25:XCME"),
    }
    quote = ["Quote", "/ESZ25:XCME", 6000.0, 6001.0]
    unknown = greeks("./EW3Z25C6100:XCME", 7)
    data = feed_data("Quote", quote, "Greeks", greeks("./EW3Z25C6000:XCME", 5) + unknown)
    (row,) = link.recv(data)
    assert isinstance(row, Snapshot)
    assert (row.contract_key, row.underlying, row.multiplier, row.quantity) == (
        "/ESZ25 EW3 2025-12-19 C 6000",
        "ES",
        Decimal(50),
        Decimal(-1),
    )
    assert (row.strike, row.option_type, row.expiration) == (
        Decimal(6000),
        OptionRight.CALL,
        date(2025, 12, 19),
    )
    assert row.underlying_price == 6000.5 and row.delta == 0.5
    assert link.conn.counters.unknown_symbol_events == 1


def test_a_replayed_recording_maps_futures_options_as_the_live_link_did() -> None:
    """The positions record keeps the feed symbols: replay needs no instruments API."""
    live = Link([ES_FOP], feeds={ES_FOP.key: ES_FEED})
    (tracked,) = [e for e in live.start() if isinstance(e, Tracked)]
    body = positions_record("tastytrade", tracked.positions, AT, tracked.details)
    positions = dx.Positions.from_record(
        [contract_from_json(c) for c in orjson.loads(orjson.dumps(body))["positions"]], body
    )
    connect = replaying()
    replayed = connect({"channel": 1})
    replayed.set_positions(positions, 0, AT)
    replayed.start(1, AT)
    quote = ["Quote", "/ESZ25:XCME", 6000.0, 6002.0]
    data = feed_data("Quote", quote, "Greeks", greeks("./EW3Z25C6000:XCME", 5))
    (row,) = replayed.receive(data, 2, AT)
    assert isinstance(row, Snapshot)
    assert (row.contract_key, row.underlying_price) == (str(ES_FOP.key), 6001.0)


def test_a_futures_option_without_feed_symbols_is_named_not_subscribed() -> None:
    link = Link()
    link.open()
    events = link.conn.set_positions([AAPL190, ES_FOP], link.now, AT)
    assert kinds(events) == ["Tracked", "note future_options_without_feed"]
    assert events[1] == Note(
        "future_options_without_feed", {"contracts": [str(ES_FOP.key)]}, "warning"
    )
    assert not any("/ESZ25" in s for _, s in link.conn.subscribed)


def test_feed_channels_are_odd() -> None:
    with pytest.raises(ValueError, match="odd"):
        DxlinkOptions(channel=2)


def test_an_unknown_call_is_a_bug() -> None:
    with pytest.raises(ValueError):
        Link().answer(Call("orders"), [])
