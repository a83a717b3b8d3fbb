"""The DXLink link rules (`connection.py`) as plain calls: no socket, no clock."""

from __future__ import annotations

import math
import random

import pytest

from greeksd.backoff import Backoff
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.connection import (
    AuthOutcome,
    ChannelPhase,
    ErrorKind,
    FeedChannel,
    Handshake,
    LinkState,
    classify_error,
)


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


def test_keepalive_runs_from_the_start_and_follows_the_server_setup() -> None:
    state = LinkState.start(100, keepalive_timeout=60, handshake_timeout=15, feed=feed())
    assert state.timer.send_interval == 30 and state.next_deadline() == 115  # handshake first
    state.on_setup(dx.Setup(10, 10, "1.0"))
    assert state.timer.send_interval == 5 and state.next_deadline() == 105
    state.on_setup(dx.Setup(None, None, "1.0"))  # a SETUP without a timeout changes nothing
    assert state.timer.send_interval == 5
    state.handshake.on_auth_state("AUTHORIZED")
    state.feed.request(101)
    state.timer.sent(103)
    assert state.next_deadline() == 108
