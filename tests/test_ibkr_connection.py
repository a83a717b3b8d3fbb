"""`IbkrConnection` as transcripts: frames, REST answers and timer ticks in, events out.
No socket, no clock: `now` is whatever the test says. Frames are built with the
simulator's own wire code (greeksd.sim.ibkr_wire), as the gateway would send them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.connection import (
    POSITIONS,
    TICKLE,
    TRADES,
    IbkrConnection,
    IbkrCounters,
    LinkSettings,
    replay_connection,
)
from greeksd.brokers.ibkr.protocol import OptionPosition, PositionScan
from greeksd.brokers.ibkr.session import COMPETING, SessionInfo
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
from greeksd.model import Contract, ContractKey, OptionRight, Snapshot, Trade
from greeksd.sim import ibkr_wire as w

AT = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)
ACCOUNT = "U1234567"
AAPL, MSFT = 265598, 272093
OPTION_SMD = '+{"fields":["31","84","86","7308","7309","7310","7311","7633"]}'
READY = w.sts({"authenticated": True, "competing": False, "message": "", "fail": ""})
SESSION_OK = SessionInfo("s1", True, False, "")


def option(
    conid: int, und: int | None, strike: str, quantity: str, root: str = "AAPL"
) -> OptionPosition:
    key = ContractKey(root, datetime(2026, 12, 18).date(), OptionRight.CALL, Decimal(strike))
    return OptionPosition(conid, und, Contract(key, root, Decimal(100), Decimal(quantity), ACCOUNT))


BIG = option(701, AAPL, "190", "-5")
MID = option(702, MSFT, "430", "3", root="MSFT")
SMALL = option(703, AAPL, "200", "1")


def scan(
    *options: OptionPosition, problems: Sequence[str] = (), unsupported: Sequence[str] = ()
) -> PositionScan:
    return PositionScan(list(options), list(problems), list(unsupported))


def sent(events: Sequence[Event]) -> list[str]:
    return [e.data for e in events if isinstance(e, Send)]


def of(kind: type, events: Sequence[Event]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def notes(events: Sequence[Event]) -> list[str]:
    return [e.event for e in events if isinstance(e, Note)]


def one_row(events: Sequence[Event]) -> Snapshot:
    (row,) = events
    assert isinstance(row, Snapshot), events
    return row


def md(conid: int, values: dict[str, str], ms: int = 1_795_000_000_000) -> str:
    return w.market_data(conid, values, ms)


class Link:
    """A Connection and a clock the test moves: `at` follows `now`."""

    def __init__(self, conn: IbkrConnection, now: float = 1000.0) -> None:
        self.conn, self.now = conn, now
        self.opened = conn.start(now, self.at)

    @property
    def at(self) -> datetime:
        return AT + timedelta(seconds=self.now - 1000.0)

    def frame(self, data: str | bytes, after: float = 0.0) -> list[Event]:
        self.now += after
        return self.conn.receive(data, self.now, self.at)

    def answer(self, call: Call, result: Any, after: float = 0.0) -> list[Event]:
        self.now += after
        return self.conn.answer(call, result, self.now, self.at)

    def tick(self, until: float | None = None) -> list[Event]:
        """The runner's timer: wake at the next deadline (or at `until`)."""
        self.now = self.conn.next_deadline() if until is None else until
        return self.conn.on_timer(self.now, self.at)

    def up(self) -> list[Event]:
        return self.frame(READY)


def link(*options: OptionPosition, **settings: Any) -> Link:
    return Link(
        IbkrConnection("s1", scan(*options), settings=LinkSettings(**settings)),
    )


def only(**due: float) -> dict[str, float]:
    """Settings in which only the named intervals ever fall due in a test."""
    intervals = ("heartbeat_s", "tickle_s", "watchdog_s", "positions_refresh_s", "smd_refresh_s")
    return dict.fromkeys(intervals, 1e9) | due


# ---- handshake ---------------------------------------------------------------------------
def test_nothing_is_sent_before_sts_says_authenticated_then_every_line_and_str() -> None:
    ln = link(SMALL, BIG, MID)
    assert ln.opened == []
    assert notes(ln.frame(w.logged_in("user"))) == ["ibkr_notice"]
    partial = [
        w.sts({"competing": False}),
        w.sts({"message": ""}),
    ]
    assert all(ln.frame(f) == [] for f in partial)
    events = ln.frame(w.sts({"authenticated": True}))
    tracked, *_ = events
    assert isinstance(tracked, Tracked)
    assert [o.conid for o in tracked.positions] == [701, 702, 703]  # largest |position| first
    assert tracked.subscriptions == 5 and tracked.details == {"lines": [701, 702, 703, AAPL, MSFT]}
    assert sent(events) == [
        f"smd+701{OPTION_SMD}",
        f"smd+702{OPTION_SMD}",
        f"smd+703{OPTION_SMD}",
        f'smd+{AAPL}+{{"fields":["31"]}}',
        f'smd+{MSFT}+{{"fields":["31"]}}',
        "str+{}",
    ]
    assert events[-2:] == [LinkUp(), TRADES]  # up once subscribed, then the backfill
    assert ln.frame(READY) == []  # a repeated status changes nothing


def test_a_split_expiry_ends_the_link_with_the_earlier_frames_message() -> None:
    ln = link(BIG)
    ln.up()
    assert ln.frame(w.sts({"message": "session expired"})) == []
    assert ln.frame(w.sts({"authenticated": False})) == [
        LinkFailed("not authenticated: session expired")
    ]


def test_a_competing_login_ends_the_link_before_or_after_it_is_up() -> None:
    for before_up in (True, False):
        ln = link(BIG)
        if not before_up:
            ln.up()
        events = ln.frame(w.sts({"authenticated": True, "competing": True}))
        assert events == [LinkFailed(COMPETING)]


def test_a_gateway_that_ignored_the_cookie_gets_the_session_on_the_socket() -> None:
    ln = link(BIG)
    assert ln.frame(w.WAITING_FOR_SESSION) == [Send('{"session":"s1"}')]


# ---- market data ---------------------------------------------------------------------------
def test_partial_updates_merge_clear_and_join_the_underlying_into_one_row_per_change() -> None:
    ln = link(BIG)
    ln.up()
    assert ln.frame(md(AAPL, {"31": "191.5"})) == []  # an underlying alone makes no row
    row = one_row(ln.frame(md(701, {"7308": "0.5", "7633": "30%", "84": "2.1"}, 1_795_000_000_123)))
    assert (row.contract_key, row.delta, row.implied_volatility, row.bid) == (
        "AAPL 2026-12-18 C 190",
        0.5,
        0.3,
        2.1,
    )
    assert row.underlying_price == 191.5 and row.received_at == ln.at
    assert row.event_time == p.epoch_ms(1_795_000_000_123)  # the gateway's `_updated`
    row = one_row(ln.frame(md(701, {"7309": "0.02"})))
    assert (row.delta, row.gamma) == (0.5, 0.02)
    assert ln.frame(md(701, {"7309": "0.02"})) == []  # nothing changed: no row
    row = one_row(ln.frame(md(701, {"7308": "", "7633": "N/A"})))
    assert (row.delta, row.gamma, row.implied_volatility) == (None, 0.02, None)
    assert ln.frame(md(999, {"7308": "0.1"})) == []  # not held: no row
    assert ln.conn.market_frames == 6


def test_delayed_and_frozen_data_is_flagged_counted_and_logged_once() -> None:
    ln = link(BIG, SMALL)
    ln.up()
    events = ln.frame(md(701, {"6509": "DpB", "7308": "0.4"}))
    row, note = events
    assert isinstance(row, Snapshot) and row.market_data == "delayed"
    assert note == Note(
        "ibkr_market_data_not_live", {"delayed_contracts": 1, "frozen_contracts": 0}, "warning"
    )
    counters = ln.conn.counters
    assert (counters.delayed_contracts, counters.frozen_contracts) == (1, 0)
    assert ln.frame(md(701, {"6509": "DpB"})) == []  # unchanged: no second warning
    assert notes(ln.frame(md(703, {"6509": "ZpB"}))) == ["ibkr_market_data_not_live"]
    assert (counters.delayed_contracts, counters.frozen_contracts) == (1, 1)
    ln.frame(md(701, {"6509": "RpB"}))
    ln.frame(md(703, {"6509": "RpB"}))
    assert (counters.delayed_contracts, counters.frozen_contracts) == (0, 0)


def test_bad_frames_are_rejected_and_gateway_errors_counted_without_ending_the_link() -> None:
    ln = link(BIG)
    ln.up()
    for bad in ("not json {", "[1, 2, 3]", '"just a string"', b"\xff\xfe binary"):
        (rejected,) = ln.frame(bad)
        assert isinstance(rejected, Rejected) and rejected.kind == "malformed_frame"
        assert rejected.excerpt and rejected.reason
    (note,) = ln.frame(w.error("Topic unknown: xyz", 1))
    assert note == Note(
        "ibkr_gateway_error", {"message": "Topic unknown: xyz", "code": 1}, "warning"
    )
    assert ln.conn.counters.gateway_errors == 1
    assert ln.frame(w.heartbeat(1)) == [] and ln.frame(p.ECHO_HB) == []
    one_row(ln.frame(md(701, {"7308": "0.5"})))


# ---- deadlines -----------------------------------------------------------------------------
def test_tic_every_heartbeat_and_tickle_every_tickle_interval_once_answered() -> None:
    ln = link(BIG, **only(heartbeat_s=60, tickle_s=45))
    ln.up()
    assert ln.tick() == [TICKLE] and ln.now == 1045
    assert ln.conn.next_deadline() == 1060  # no second tickle while one is out
    assert ln.tick() == [Send("tic")] and ln.now == 1060
    assert ln.answer(TICKLE, SESSION_OK, after=2) == []  # answered at 1062
    assert ln.tick() == [TICKLE] and ln.now == 1107
    assert ln.tick() == [Send("tic")] and ln.now == 1120


def test_every_smd_is_renewed_every_smd_refresh_interval_from_the_link_being_up() -> None:
    ln = link(BIG, **only(smd_refresh_s=540))
    ln.frame(READY, after=5)  # up at 1005
    renewal = [Send(f"smd+701{OPTION_SMD}"), Send(f'smd+{AAPL}+{{"fields":["31"]}}')]
    assert ln.tick(until=1544.9) == []  # an early wake-up does nothing
    assert ln.tick() == renewal and ln.now == 1545
    assert ln.tick() == renewal and ln.now == 2085


def test_positions_are_refreshed_one_call_at_a_time() -> None:
    ln = link(BIG, **only(positions_refresh_s=60))
    ln.frame(READY, after=5)
    assert ln.tick() == [POSITIONS] and ln.now == 1065
    assert ln.conn.next_deadline() > 1e8  # not again until answered
    ln.answer(POSITIONS, scan(BIG), after=1)
    assert ln.conn.next_deadline() == 1126


def test_silence_for_the_watchdog_interval_ends_the_link_and_any_frame_resets_it() -> None:
    ln = link(BIG, **only(watchdog_s=30))
    assert ln.conn.next_deadline() == 1030
    ln.frame(w.heartbeat(1), after=20)
    assert ln.conn.next_deadline() == 1050
    assert ln.tick(until=1049.9) == []
    assert ln.tick() == [LinkFailed("no message for 30s (watchdog)")]
    assert ln.tick(until=1100) == []  # once


def test_deadlines_are_none_before_start_as_in_replay() -> None:
    conn = IbkrConnection("s1", scan(BIG))
    assert conn.next_deadline() == math.inf


# ---- positions -----------------------------------------------------------------------------
def test_positions_opened_and_closed_are_subscribed_and_unsubscribed() -> None:
    ln = link(BIG, MID)
    ln.up()
    events = ln.answer(POSITIONS, scan(BIG, SMALL))  # MID closed, SMALL opened
    tracked = of(Tracked, events)[0]
    assert [o.conid for o in tracked.positions] == [701, 703]
    assert tracked.subscriptions == 3 and tracked.details == {"lines": [701, 703, AAPL]}
    assert sent(events) == ["umd+702+{}", f"umd+{MSFT}+{{}}", f"smd+703{OPTION_SMD}"]
    assert ln.frame(md(702, {"7308": "0.5"})) == []  # no longer held: no row
    assert len(ln.frame(md(703, {"7308": "0.5"}))) == 1
    again = ln.answer(POSITIONS, scan(BIG, SMALL))
    assert sent(again) == [] and len(of(Tracked, again)) == 1  # recorded, nothing sent


def test_positions_before_the_link_is_up_are_tracked_and_subscribed_at_sts() -> None:
    ln = link()
    assert ln.conn.set_positions([BIG], ln.now, ln.at) == []
    events = ln.up()
    assert sent(events)[:2] == [f"smd+701{OPTION_SMD}", f'smd+{AAPL}+{{"fields":["31"]}}']


def test_max_lines_keeps_the_largest_positions_and_reports_what_was_left_out_once() -> None:
    ln = link(SMALL, BIG, MID, max_lines=2)
    assert notes(ln.opened) == ["ibkr_lines_left_out"]
    assert of(Note, ln.opened)[0].fields == {
        "count": 1,
        "max_lines": 2,
        "contracts": "AAPL 2026-12-18 C 200",
    }
    assert ln.conn.counters.left_out == ["AAPL 2026-12-18 C 200"]
    events = ln.up()
    assert sent(events)[:-1] == [f"smd+701{OPTION_SMD}", f"smd+702{OPTION_SMD}"]  # no room
    assert "ibkr_lines_left_out" not in notes(ln.answer(POSITIONS, scan(SMALL, BIG, MID)))
    ln.answer(POSITIONS, scan(BIG))
    assert ln.conn.counters.left_out == []


def test_a_scan_counts_unsupported_and_unusable_positions_logging_each_reason_once() -> None:
    counters = IbkrCounters()
    why = "futures option 9: its future (undConid 77) is unknown to the gateway"
    conn = IbkrConnection(
        "s1", scan(BIG, problems=["bad option position 8: x"], unsupported=[why]), counters=counters
    )
    events = conn.start(0.0, AT)
    assert notes(events) == ["ibkr_position_skipped", "ibkr_position_unsupported"]
    assert of(Note, events)[1].fields == {"reason": why, "count": 1}
    assert (counters.unsupported_positions, counters.unparsable_positions) == (1, 1)
    assert counters.unsupported_reasons == {why: 1}
    again = conn.answer(POSITIONS, scan(BIG, unsupported=[why]), 1.0, AT)
    assert "ibkr_position_unsupported" not in notes(again)
    conn.answer(POSITIONS, scan(BIG), 2.0, AT)
    assert (counters.unsupported_positions, counters.unsupported_reasons) == (0, {})


ESZ6 = 900001
FOP_KEY = ContractKey(
    "EW3", datetime(2026, 11, 27).date(), OptionRight.CALL, Decimal(6025), "ESZ26"
)
FOP = OptionPosition(
    551234567, ESZ6, Contract(FOP_KEY, "ES", Decimal(50), Decimal(2), ACCOUNT, "CME")
)


def test_a_futures_option_streams_with_its_future_as_the_underlying_line() -> None:
    ln = link(BIG, FOP)
    events = ln.up()
    assert set(sent(events)[:4]) == {
        f"smd+701{OPTION_SMD}",
        f"smd+551234567{OPTION_SMD}",
        f'smd+{AAPL}+{{"fields":["31"]}}',
        f'smd+{ESZ6}+{{"fields":["31"]}}',
    }
    assert ln.frame(md(ESZ6, {"31": "6031.25"})) == []  # a future's price is no row
    row = one_row(ln.frame(md(551234567, {"31": "41.5", "7308": "0.55", "7633": "14.2%"})))
    assert (row.contract_key, row.underlying, row.multiplier) == (
        "/ESZ26 EW3 2026-11-27 C 6025",
        "ES",
        Decimal(50),
    )
    assert (row.underlying_price, row.delta, row.last) == (6031.25, 0.55, 41.5)
    assert ln.conn.option_keys[551234567] == FOP_KEY


# ---- REST outcomes -------------------------------------------------------------------------
def test_a_penalty_box_degrades_moves_every_call_past_it_and_recovers_after() -> None:
    ln = link(BIG, **only(tickle_s=60, positions_refresh_s=60))
    ln.up()
    assert ln.tick() == [TICKLE, POSITIONS] and ln.now == 1060
    box = CallFailed("gateway penalty box until 15:41:00 UTC", "penalty_box", 600.0)
    assert ln.answer(TICKLE, box) == [
        Note("ibkr_tickle_skipped", {"error": box.reason}, "warning"),
        Degraded("gateway penalty box until 15:41:00 UTC"),
    ]
    boxed_until = ln.at + timedelta(seconds=600)
    assert ln.conn.counters.penalty_box_until == boxed_until
    ln.answer(POSITIONS, CallFailed(box.reason, "penalty_box", 599.0), after=1)  # refused
    # a call answered before the 429 landed: the box is not over
    assert ln.answer(TRADES, [], after=1) == []
    assert ln.conn.counters.penalty_box_until == boxed_until
    # nothing is asked for inside the box; its next turn counts from the box's end
    assert ln.tick() == [TICKLE, POSITIONS] and ln.now == 1060 + 600 + 60
    assert ln.answer(TICKLE, SESSION_OK) == [Recovered(), Note("ibkr_penalty_box_over")]
    assert ln.conn.counters.penalty_box_until is None
    assert ln.answer(POSITIONS, scan(BIG))[:1] == [Tracked([BIG], 2, {"lines": [701, AAPL]})]


def test_a_link_lost_inside_a_penalty_box_waits_for_its_end() -> None:
    ln = link(BIG, **only(watchdog_s=30))
    ln.up()
    ln.answer(TRADES, CallFailed("box", "penalty_box", 600.0), after=10)  # at 1010
    assert ln.tick() == [LinkFailed("no message for 30s (watchdog)", wait_s=580.0)]


@pytest.mark.parametrize("kind", ["not_authenticated", "not_logged_in", "no_bridge"])
def test_a_call_finding_the_session_gone_ends_the_link(kind: str) -> None:
    ln = link(BIG)
    ln.up()
    assert ln.answer(POSITIONS, CallFailed("no bridge: log in", kind)) == [
        LinkFailed("no bridge: log in")
    ]


def test_tickle_ends_the_link_when_unanswered_or_unusable_other_calls_are_retried() -> None:
    ln = link(BIG)
    ln.up()
    expired = SessionInfo("", False, False, "session expired")
    assert ln.answer(TICKLE, expired) == [LinkFailed("not authenticated: session expired")]
    assert ln.answer(TICKLE, CallFailed("POST /tickle: ConnectError", "unavailable")) == [
        LinkFailed("POST /tickle: ConnectError")
    ]
    failed = ln.answer(POSITIONS, CallFailed("GET /portfolio/accounts: HTTP 500", "error"))
    assert failed == [
        Note(
            "ibkr_positions_refresh_failed",
            {"error": "GET /portfolio/accounts: HTTP 500"},
            "warning",
        )
    ]
    assert ln.conn.lines  # still streaming what it has


# ---- executions ----------------------------------------------------------------------------
def execution(
    conid: int, execution_id: str = "e.1", sec_type: str = "OPT", **extra: Any
) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "symbol": "AAPL",
        "side": "B",
        "size": 2.0,
        "price": "3.45",
        "trade_time_r": 1_795_000_000_000,
        "account": ACCOUNT,
        "sec_type": sec_type,
        "conid": conid,
        **extra,
    }


def test_live_executions_of_held_options_become_trades_with_their_key() -> None:
    ln = link(BIG)
    ln.up()
    (trade,) = ln.frame(w.trades([execution(701)]))
    assert isinstance(trade, Trade)
    assert (trade.contract_key, trade.side, trade.quantity) == ("AAPL 2026-12-18 C 190", "buy", 2)
    assert ln.conn.counters.trades == 1


def test_an_unknown_option_conid_is_looked_up_once_then_its_trades_go_out() -> None:
    ln = link(BIG)
    ln.up()
    (lookup,) = ln.frame(w.trades([execution(799, "e.1"), execution(701, "e.2")]))
    assert isinstance(lookup, Call)
    assert lookup == Call("secdef", ((799,),))
    secdef = {
        799: {
            "conid": 799,
            "tradingClass": "SPXW",
            "expiry": "20261218",
            "putOrCall": "P",
            "strike": "5800",
        }
    }
    trades = of(Trade, ln.answer(lookup, secdef))
    assert [(t.broker_trade_id, t.contract_key) for t in trades] == [
        ("e.1", "SPXW 2026-12-18 P 5800"),
        ("e.2", "AAPL 2026-12-18 C 190"),
    ]
    (known,) = ln.frame(w.trades([execution(799, "e.3")]))  # learned: no second lookup
    assert isinstance(known, Trade) and known.contract_key == "SPXW 2026-12-18 P 5800"


def test_a_failed_lookup_still_delivers_the_trades_without_a_key() -> None:
    ln = link(BIG)
    ln.up()
    (lookup,) = ln.frame(w.trades([execution(799)]))
    assert isinstance(lookup, Call)
    events = ln.answer(lookup, CallFailed("GET /trsrv/secdef: HTTP 500", "error"))
    assert notes(events) == ["ibkr_secdef_failed", "ibkr_execution_without_key"]
    (trade,) = of(Trade, events)
    assert trade.contract_key is None


def test_a_bad_execution_is_counted_and_its_neighbours_still_go_out() -> None:
    ln = link(BIG)
    ln.up()
    events = ln.answer(
        TRADES,
        [
            execution(701, "e.1"),
            {"execution_id": "bad.1", "side": "X"},
            execution(0, "e.2", sec_type="STK"),
        ],
    )
    assert [t.broker_trade_id for t in of(Trade, events)] == ["e.1", "e.2"]
    assert notes(events) == ["ibkr_execution_rejected"] and not of(Rejected, events)
    assert (ln.conn.counters.trades, ln.conn.counters.rejected_trades) == (2, 1)


def test_option_keys_outlive_the_link_that_learned_them() -> None:
    keys: dict[int, ContractKey] = {}
    IbkrConnection("s1", scan(BIG), option_keys=keys)
    later = Link(IbkrConnection("s2", scan(), option_keys=keys))
    later.up()
    (trade,) = later.frame(w.trades([execution(701)]))  # the position is gone by now
    assert isinstance(trade, Trade) and trade.contract_key == "AAPL 2026-12-18 C 190"


# ---- replay --------------------------------------------------------------------------------
def test_replay_plans_lines_with_the_recorded_max_lines() -> None:
    assert replay_connection({}).settings.max_lines == 100
    conn = replay_connection({"max_lines": 1})
    conn.set_positions([BIG], 0.0, AT)
    assert conn.wanted == {701: p.OPTION_FIELDS}  # no room left for the underlying
