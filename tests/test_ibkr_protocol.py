"""The sans-I/O IBKR core against recorded frame shapes (tests/fixtures/ibkr)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from greeksd.brokers.ibkr import pacing
from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr import session as c
from greeksd.model import Broker, ContractKey, OptionRight
from greeksd.sim import ibkr_wire as w
from tests.ibkr_commands import Command, parse_command

FIXTURES = Path(__file__).parent / "fixtures" / "ibkr"
FRAMES = [json.loads(line) for line in (FIXTURES / "frames.jsonl").read_text().splitlines()]
VALUES = json.loads((FIXTURES / "values.json").read_text())
POSITIONS = json.loads((FIXTURES / "positions.json").read_text())
RECEIVED = datetime(2024, 6, 3, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize("case", FRAMES, ids=[c["name"] for c in FRAMES])
def test_every_recorded_frame_kind_parses_to_its_event(case: dict[str, Any]) -> None:
    event = p.parse_frame(case["frame"])
    assert type(event).__name__ == case["event"], event
    values = asdict(event)
    for name, expected in case["attrs"].items():
        actual = values[name]
        assert (list(actual) if isinstance(actual, tuple) else actual) == expected, name


def test_bytes_frames_parse_like_text() -> None:
    assert p.parse_frame(b'{"topic":"system","hb":5}') == p.Heartbeat(5)
    assert isinstance(p.parse_frame(b"\xff\xfe"), p.Malformed)


@pytest.mark.parametrize(("raw", "expected"), VALUES, ids=[repr(v[0]) for v in VALUES])
def test_value_formats(raw: Any, expected: float | None) -> None:
    assert p.parse_value(raw) == (pytest.approx(expected) if expected is not None else None)


def test_iv_percent_is_stored_as_a_fraction() -> None:
    assert p.parse_fraction("28.4%") == 0.284
    assert p.parse_fraction("N/A") is None
    # what the '%' fast path leaves to parse_value: the same result as a plain number
    assert p.parse_fraction(" 28.4%") == p.parse_fraction("C28.4%") == 0.284
    assert p.parse_fraction("1,234%") == 12.34
    assert p.parse_fraction("inf%") is p.parse_fraction("nan%") is p.parse_fraction("%") is None


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_iv_percent_is_the_correctly_rounded_fraction(percent: float) -> None:
    assert p.parse_fraction(f"{percent!r}%") == float(Decimal(repr(percent)) / 100)


def test_commands_are_text_in_topic_args_format() -> None:
    assert p.smd_command(265598) == (
        'smd+265598+{"fields":["31","84","86","7308","7309","7310","7311","7633"]}'
    )
    assert p.smd_command(265598, ["31"], exchange="CBOE") == 'smd+265598@CBOE+{"fields":["31"]}'
    assert p.umd_command(265598) == "umd+265598+{}"
    assert (p.TIC, p.ECHO_HB) == ("tic", "ech+hb")


def test_session_cookie_round_trips() -> None:
    cookie = p.session_cookie("4f3b2a1c")
    assert cookie == 'api={"session": "4f3b2a1c"}'
    assert w.session_from_cookie("x=1; " + cookie + "; y=2") == "4f3b2a1c"
    assert w.session_from_cookie("api=garbage") is None
    assert w.session_from_cookie(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('smd+265598+{"fields":["31"]}', Command("smd", "265598", {"fields": ["31"]})),
        ('smd+265598@CBOE+{"fields":[]}', Command("smd", "265598@CBOE", {"fields": []})),
        ("umd+265598+{}", Command("umd", "265598")),
        ("tic", Command("tic")),
        ("ech+hb", Command("ech", "hb")),
        ("str+{}", Command("str")),
        ('{"session":"abc"}', None),
        ("smd+1+{broken", None),
        ("SMD+1+{}", None),
    ],
)
def test_parse_command(text: str, expected: Command | None) -> None:
    assert parse_command(text) == expected
    if expected and expected.topic == "smd":
        assert expected.conid == 265598


def _positions() -> list[p.OptionPosition]:
    return [p.parse_option_position(row, "U1") for row in POSITIONS[:2]]


def test_positions_become_contracts_with_trading_class_roots() -> None:
    spxw, aapl = _positions()
    assert spxw.contract.key == ContractKey(
        "SPXW", date(2024, 6, 21), OptionRight.CALL, Decimal(5000)
    )
    assert (spxw.conid, spxw.und_conid, spxw.contract.underlying) == (688415710, 416904, "SPX")
    assert (spxw.contract.quantity, spxw.contract.multiplier) == (Decimal(-2), Decimal(100))
    assert spxw.contract.account_id == "U1234567"
    assert str(aapl.contract.key) == "AAPL 2025-01-17 P 192.5"
    assert [p.is_option(row) for row in POSITIONS] == [True, True, False, True]


def test_incomplete_position_names_what_secdef_must_fill() -> None:
    bare = POSITIONS[3]
    assert set(p.missing_option_fields(bare)) == {
        "expiry",
        "putOrCall",
        "strike",
        "multiplier",
        "tradingClass",
    }
    with pytest.raises(ValueError, match="712345678"):
        p.parse_option_position(bare, "U1")
    secdef = {
        "expiry": "20250321",
        "putOrCall": "C",
        "strike": "420",
        "multiplier": 100,
        "tradingClass": "MSFT",
    }
    merged = p.parse_option_position({**secdef, **bare}, "U1")
    assert str(merged.contract.key) == "MSFT 2025-03-21 C 420"


def _book() -> tuple[p.MarketDataBook, p.OptionPosition]:
    book = p.MarketDataBook()
    option = _positions()[1]
    book.track(option)
    return book, option


def _md(conid: int, fields: dict[str, str], updated: int | None = 1717425000000) -> p.MarketData:
    return p.MarketData(conid, fields, updated)


def test_sparse_first_message_emits_nothing_then_values_do() -> None:
    book, option = _book()
    assert book.apply(_md(option.conid, {"6119": "q0", "6509": "RpB"}), RECEIVED) is None
    snap = book.apply(_md(option.conid, {"31": "4.10", "7308": "-0.41", "7633": "28.4%"}), RECEIVED)
    assert snap is not None
    assert snap.broker is Broker.IBKR and snap.contract_key == "AAPL 2025-01-17 P 192.5"
    assert (snap.last, snap.delta, snap.implied_volatility) == (4.10, -0.41, 0.284)
    assert snap.gamma is None and snap.theta is None and snap.vega is None and snap.rho is None
    assert snap.event_time == datetime(2024, 6, 3, 14, 30, tzinfo=UTC)
    assert snap.received_at == RECEIVED
    assert snap.source_payload == {
        "6119": "q0",
        "6509": "RpB",
        "31": "4.10",
        "7308": "-0.41",
        "7633": "28.4%",
    }


def test_partial_updates_merge_absent_keeps_and_empty_clears() -> None:
    book, option = _book()
    book.apply(_md(option.conid, {"7308": "-0.41", "7309": "0.03", "7310": "-0.18"}), RECEIVED)
    snap = book.apply(_md(option.conid, {"7309": "0.031"}), RECEIVED)
    assert snap is not None and (snap.delta, snap.gamma, snap.theta) == (-0.41, 0.031, -0.18)
    snap = book.apply(_md(option.conid, {"7308": "", "7310": "N/A"}), RECEIVED)
    assert snap is not None and (snap.delta, snap.gamma, snap.theta) == (None, 0.031, None)
    assert "7308" not in snap.source_payload  # type: ignore[operator]


def test_only_greek_or_price_changes_emit() -> None:
    book, option = _book()
    assert book.apply(_md(option.conid, {"7308": "-0.41"}), RECEIVED) is not None
    assert book.apply(_md(option.conid, {"7308": "-0.41"}), RECEIVED) is None  # unchanged
    assert book.apply(_md(option.conid, {"6509": "DpB"}), RECEIVED) is None  # bookkeeping
    assert book.apply(_md(999, {"7308": "0.5"}), RECEIVED) is None  # not an option we hold


def test_a_change_is_against_the_merged_fields_whenever_they_were_merged() -> None:
    """Clearing what was never set changes nothing; values merged before the option was
    tracked count as known once it is; after untrack the next update is new again."""
    book, option = _book()
    assert book.apply(_md(option.conid, {"7309": "", "31": "N/A"}), RECEIVED) is None
    book.untrack(option.conid)
    assert book.apply(_md(option.conid, {"7308": "-0.41"}), RECEIVED) is None  # not held
    book.track(option)
    assert book.apply(_md(option.conid, {"7308": "-0.41", "6509": "RpB"}), RECEIVED) is None
    assert book.apply(_md(option.conid, {"7308": ""}), RECEIVED) is not None  # cleared
    book.untrack(option.conid)
    book.track(option)
    assert book.apply(_md(option.conid, {"7308": "-0.41"}), RECEIVED) is not None


def test_underlying_price_is_joined_by_und_conid_and_missing_time_uses_received() -> None:
    book, option = _book()
    assert book.apply(_md(265598, {"31": "C193.10"}), RECEIVED) is None
    snap = book.apply(_md(option.conid, {"84": "4.0"}, updated=None), RECEIVED)
    assert snap is not None and snap.underlying_price == 193.10 and snap.bid == 4.0
    assert snap.event_time == RECEIVED


def test_untrack_forgets_the_option() -> None:
    book, option = _book()
    book.untrack(option.conid)
    assert book.apply(_md(option.conid, {"7308": "-0.4"}), RECEIVED) is None


def test_server_frames_parse_back() -> None:
    frame = w.market_data(42, {"7308": "0.5"}, 1700000000000)
    assert p.parse_frame(frame) == p.MarketData(42, {"7308": "0.5"}, 1700000000000)
    sts = w.sts({"authenticated": False, "competing": True, "message": "", "fail": ""})
    assert p.parse_frame(sts) == p.AuthStatus(False, True, "", "")
    assert p.parse_frame(w.WAITING_FOR_SESSION) == p.WaitingForSession()


def test_market_data_keeps_the_field_ids_and_only_them() -> None:
    """Every key that starts with a digit is a field (even one IBKR has not documented),
    nothing else is: not the frame's own keys, not one nobody expected."""
    frame = orjson.dumps(
        {"topic": "smd+42", "conid": 42, "conidEx": "42", "server_id": "q1", "_updated": 7,
         "31": "1.5", "7308": 0.5, "6509": "RpB", "extra": "x", "_y": 1, "\u00b2": "z"}
    ).decode()  # fmt: skip
    assert p.parse_frame(frame) == p.MarketData(
        42, {"31": "1.5", "7308": "0.5", "6509": "RpB", "\u00b2": "z"}, 7
    )
    plain = '{"topic":"smd+42@SMART","31":"1.5","7308":"0.5"}'  # conid from the topic
    assert p.parse_frame(plain) == p.MarketData(42, {"31": "1.5", "7308": "0.5"}, None)


def test_a_partial_sts_leaves_absent_flags_unknown_and_odd_types_malformed() -> None:
    sts = '{"topic":"sts","args":%s}'
    assert p.parse_frame(sts % '{"competing":false}') == p.AuthStatus(None, False, "", "")
    assert p.parse_frame(sts % '{"message":"x"}') == p.AuthStatus(None, None, "x", "")
    assert p.parse_frame(sts % '{"authenticated":null}') == p.AuthStatus(None, None, "", "")
    assert isinstance(p.parse_frame(sts % '{"authenticated":"false"}'), p.Malformed)


def _decide(*frames: dict[str, Any]) -> list[c.Ready | c.Lost | None]:
    state = c.SessionState()
    return [state.update(p.AuthStatus(**{"message": "", "fail": "", **f})) for f in frames]


def test_session_state_decides_only_on_explicit_flags_across_split_frames() -> None:
    # a login as real gateways send it: competing, then message, then authenticated
    split_login = _decide(
        {"authenticated": None, "competing": False},
        {"authenticated": None, "competing": None},
        {"authenticated": True, "competing": None},
    )
    assert split_login == [None, None, c.Ready()]
    # an expiry: the message arrives before the flag it explains
    expiry = _decide(
        {"authenticated": None, "competing": False},
        {"authenticated": None, "competing": None, "message": "session expired"},
        {"authenticated": False, "competing": None},
    )
    assert expiry == [None, None, c.Lost("not authenticated: session expired")]
    assert _decide({"authenticated": True, "competing": True}) == [c.Lost(c.COMPETING)]
    assert _decide({"authenticated": None, "competing": True}) == [c.Lost(c.COMPETING)]
    assert _decide({"authenticated": True, "competing": False}) == [c.Ready()]


def test_market_data_quality_comes_from_field_6509_and_marks_rows() -> None:
    assert [p.market_data_quality(v) for v in ("RpB", "DpB", "ZpB", "YpB", "N", "", None)] == [
        "live",
        "delayed",
        "frozen",
        "frozen",
        None,
        None,
        None,
    ]
    book, option = _book()
    snap = book.apply(_md(option.conid, {"7308": "-0.41"}), RECEIVED)
    assert snap is not None and snap.market_data is None  # 6509 not seen yet: unknown
    book.apply(_md(option.conid, {"6509": "DpB"}), RECEIVED)
    snap = book.apply(_md(option.conid, {"7308": "-0.42"}), RECEIVED)
    assert snap is not None and snap.market_data == "delayed"
    assert book.quality_counts() == {"delayed_contracts": 1, "frozen_contracts": 0}
    book.apply(_md(option.conid, {"6509": "ZpB"}), RECEIVED)
    assert book.quality_counts() == {"delayed_contracts": 0, "frozen_contracts": 1}


def test_json_number_values_are_taken_as_their_text() -> None:
    frame = '{"topic":"smd+42","conid":42,"_updated":1,"31":190.125,"7308":0.56,"84":""}'
    event = p.parse_frame(frame)
    assert event == p.MarketData(42, {"31": "190.125", "7308": "0.56", "84": ""}, 1)


def test_rest_answers_name_what_the_user_must_do() -> None:
    url = "https://localhost:5000"
    assert c.rest_failure("POST", "/tickle", 200, {}, "", url) is None
    assert c.rest_failure("POST", "/tickle", 401, None, "", url) == (
        c.Failure.NOT_LOGGED_IN,
        "gateway not logged in: open https://localhost:5000 and log in",
    )
    no_bridge = c.rest_failure("GET", "/iserver/accounts", 400, {"error": "no bridge"}, "", url)
    assert no_bridge is not None and no_bridge[0] is c.Failure.NO_BRIDGE
    assert 'answered 400 "no bridge"' in no_bridge[1] and url in no_bridge[1]
    elsewhere = c.rest_failure("GET", "/portfolio/accounts", 400, {"error": "no bridge"}, "", url)
    assert elsewhere is not None and elsewhere[0] is c.Failure.ERROR  # only /iserver/* says it
    other_401 = c.rest_failure("GET", "/portfolio/accounts", 401, None, "", url)
    assert other_401 == (
        c.Failure.NOT_AUTHENTICATED,
        "not authenticated (HTTP 401 on GET /portfolio/accounts)",
    )
    too_many = c.rest_failure("GET", "/iserver/accounts", 429, None, "", url)
    assert too_many is not None and too_many[0] is c.Failure.PENALTY_BOX
    assert c.tickle_session({"error": "no session"}) == ("", False, False, "no session")


def test_pacer_keeps_the_global_and_per_endpoint_spacing_and_the_penalty_box() -> None:
    pacer = pacing.RestPacer()
    assert pacer.acquire("/tickle", 0.0) == 0.0
    assert pacer.acquire("/iserver/accounts", 0.0) == pytest.approx(0.1)  # 10/s overall
    assert pacer.acquire("/iserver/accounts", 0.1) == 0.0
    assert pacer.acquire("/tickle", 0.2) == pytest.approx(0.8)  # tickle 1/s
    assert pacer.acquire("/portfolio/accounts", 0.2) == 0.0  # the waiting tickle holds none
    assert pacer.acquire("/portfolio/accounts", 1.0) == pytest.approx(4.2)  # 1 per 5 s
    assert pacer.acquire("/tickle", 1.0) == 0.0
    assert pacer.acquire("/iserver/account/trades", 10.0) == 0.0
    assert pacer.acquire("/iserver/account/trades", 14.9) == pytest.approx(0.1)
    unpaced = pacing.RestPacer(scale=0.0)  # what `min_interval=0` gives (simulator tests)
    assert unpaced.acquire("/tickle", 3.0) == unpaced.acquire("/tickle", 3.0) == 0.0
    wall = datetime(2026, 1, 2, 14, 0, tzinfo=UTC)
    assert pacer.penalize(100.0, wall, None) == 600.0  # no Retry-After: ~10 minutes
    assert pacer.penalty_remaining(699.0) == pytest.approx(1.0)
    assert pacer.penalty_remaining(700.0) == 0.0
    assert pacer.penalty_reason() == "gateway penalty box until 14:10:00 UTC"
    assert pacer.penalize(800.0, wall, 30.0) == 30.0  # Retry-After wins
    assert pacer.penalty_reason() == "gateway penalty box until 14:00:30 UTC"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
frame_like = st.fixed_dictionaries(
    {
        "topic": st.sampled_from(
            ["smd+1", "smd+x", "system", "sts", "act", "tic", "blt", "error", "zzz"]
        )
    },
    optional={
        "args": json_values,
        "hb": json_values,
        "conid": json_values,
        "31": json_values,
        "7633": json_values,
        "_updated": json_values,
        "success": json_values,
        "error": json_values,
    },
)


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_random_input_never_raises(data: bytes | str) -> None:
    assert p.parse_frame(data) is not None


@given(json_values | frame_like)
def test_random_json_never_raises(value: Any) -> None:
    event = p.parse_frame(
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS) if _encodable(value) else b"null"
    )
    if isinstance(event, p.MarketData):
        for raw in event.fields.values():
            p.parse_value(raw)  # no exception, whatever the value


def _encodable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def _bits(values: list[float | None]) -> list[str | None]:
    """Values compared exactly: -0.0 is not 0.0, each float by its bits."""
    return [None if v is None else v.hex() for v in values]


_numeral = st.one_of(
    st.floats().map(repr),  # every double, nan and infinities among them
    st.floats(allow_nan=False).map(lambda v: f"{v:.25g}"),  # more digits than a double
    st.decimals(allow_nan=True).map(str),
    st.integers(-(10**30), 10**30).map(str),  # JSON integers, '-0' among them
    st.from_regex(r"\A[-+]?\d{0,20}(\.\d{0,20})?([eE][-+]?\d{1,4})?\Z"),
    st.text(alphabet='0123456789.-+eE,[]{} \t_nulaNfiCHKM%"trsx', max_size=12),
    st.sampled_from(
        [
            "null",
            "-0",
            "1e999",
            "-1e400",
            "nan",
            "1,234",
            "C193.10",
            "1.2M",
            "28.4%",
            "true",
            "[1]",
            '"1"',
            "1]",
            " 1.5 ",
            "1_000",
            "\u00a01",
        ]
    ),
)


@given(st.lists(_numeral, min_size=1, max_size=10))
def test_numbers_parsed_as_one_array_are_what_parse_value_gives_each(texts: list[str]) -> None:
    """The book parses a row's prices and Greeks as one JSON array: exactly the floats
    (bit for bit) and Nones `parse_value` gives each text, or None (parse them one by
    one), whatever the texts hold; plain numbers never take the slow path."""
    values = p._plain_numbers(f"[{','.join(texts)}]", len(texts))
    if values is not None:
        assert _bits(values) == _bits([p.parse_value(t) for t in texts])
    if all(t == "null" or _is_float_repr(t) for t in texts):
        assert values is not None


def _is_float_repr(text: str) -> bool:
    """A finite float's repr with a point ('0.3062', '-1.5e-07'), as brokers send."""
    try:
        return "." in text and text == repr(float(text)) and math.isfinite(float(text))
    except ValueError:
        return False


@given(_numeral.map(lambda t: t + "%") | st.from_regex(r"\A-?\d{1,8}(\.\d{1,8})?%\Z"))
def test_a_percent_iv_parsed_in_the_array_is_what_parse_fraction_gives(raw: str) -> None:
    """The book's IV ('28.4%') rides in the same array as '28.4e-2': when that parses,
    it is `parse_fraction`'s value, bit for bit."""
    if len(raw) > 16:
        return  # the book sends longer ones to parse_fraction
    values = p._plain_numbers(f"[{raw[:-1]}e-2]", 1)
    if values is not None:
        assert _bits(values) == _bits([p.parse_fraction(raw)])


_field_id = st.one_of(
    st.sampled_from(sorted(p._KNOWN_IDS)),
    st.sampled_from(["", "55", "x7308", "7308x", "a", "_x", "\u0663", *p._SMD_META]),
    st.text(max_size=4),
)


@given(
    st.dictionaries(
        _field_id,
        st.one_of(
            st.text(max_size=6),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
            st.none(),
        ),
        max_size=12,
    )
)
def test_market_data_fields_are_the_digit_keyed_ones_whatever_a_frame_holds(
    extra: dict[str, Any],
) -> None:
    """The smd fast paths (all meta keys present, every id a known one) keep exactly
    the fields a plain filter keeps: ids starting with a digit, values as text."""
    # (an `_updated` like '²' passes isdigit() but not int(): a Malformed frame)
    extra.pop("_updated", None)
    frame = {**extra, "topic": "smd+265598", "conid": 265598}
    event = p.parse_frame(orjson.dumps(frame).decode())
    assert isinstance(event, p.MarketData)
    expected = {
        k: p._as_text(v) for k, v in frame.items() if k not in p._SMD_META and k[:1].isdigit()
    }
    assert event.fields == expected
