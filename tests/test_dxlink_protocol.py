"""The sans-I/O DXLink core: parsing, COMPACT/FULL decoding, symbols, row mapping."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greeksd.brokers.tastytrade import protocol as dx
from greeksd.model import Broker, Contract, ContractKey, OptionRight, keeping_payload

RECEIVED = datetime(2025, 6, 10, 16, 0, tzinfo=UTC)
SPEC_FIELDS = {
    "Greeks": (
        "eventType",
        "eventSymbol",
        "eventTime",
        "time",
        "sequence",
        "price",
        "volatility",
        "delta",
        "gamma",
        "theta",
        "rho",
        "vega",
    )
}
SPEC_FRAME = (
    '{"type":"FEED_DATA","channel":1,"data":["Greeks",["Greeks",".AAPL250620C190",0,'
    "1718035200123,0,5.35,0.2712,0.5231,0.0312,-0.0841,0.0422,0.2133,"
    '"Greeks",".AAPL250620P180",0,1718035200125,0,2.10,0.2901,-0.3112,0.0275,-0.0712,'
    '"NaN",0.1876]]}'
)


def contract(key: str, quantity: int = 1, account: str = "5WT1", underlying: str = "AAPL"):
    return Contract(ContractKey.parse(key), underlying, Decimal(100), Decimal(quantity), account)


def decode(frame: str, layouts=SPEC_FIELDS):
    message = dx.parse(frame)
    assert isinstance(message, dx.FeedData), message
    return dx.decode_feed_data(message.data, layouts)


def test_compact_array_with_several_events_decodes_each_by_config_order() -> None:
    events, problems = decode(SPEC_FRAME)
    assert problems == []
    assert [e["eventSymbol"] for e in events] == [".AAPL250620C190", ".AAPL250620P180"]
    assert events[0]["delta"] == 0.5231 and events[0]["time"] == 1718035200123
    assert events[1]["theta"] == -0.0712 and events[1]["vega"] == 0.1876


def test_nan_infinity_null_and_missing_fields_become_none() -> None:
    frame = {
        "type": "FEED_DATA",
        "channel": 1,
        "data": [
            "Greeks",
            [
                "Greeks",
                ".A250620C1",
                0,
                1,
                0,
                "Infinity",
                "-Infinity",
                None,
                0.5,
                0.1,
                "NaN",
                0.2,
            ],
        ],
    }
    events, _ = decode(orjson.dumps(frame).decode())
    greeks = events[0]
    assert greeks["price"] is None and greeks["volatility"] is None
    assert greeks["delta"] is None and greeks["rho"] is None
    assert greeks["gamma"] == 0.5
    # bare NaN tokens (not valid JSON, but some encoders emit them) are None too
    events, _ = decode(SPEC_FRAME.replace('"NaN"', "NaN").replace("0.2133", "Infinity"))
    assert events[1]["rho"] is None and events[0]["vega"] is None
    # FULL events may simply leave fields out
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract("A 2025-06-20 C 1", underlying="A")])
    rows, problems = mapper.map([{"eventType": "Greeks", "eventSymbol": ".A250620C1"}], RECEIVED)
    assert problems == []
    assert rows[0].delta is None and rows[0].rho is None and rows[0].event_time == RECEIVED


def test_full_format_decodes_objects() -> None:
    frame = {
        "type": "FEED_DATA",
        "channel": 3,
        "data": [
            {"eventType": "Greeks", "eventSymbol": ".SPY250620C512.5", "delta": 0.4, "rho": "NaN"},
            {"eventType": "Quote", "eventSymbol": "SPY", "bidPrice": 511.0, "askPrice": 511.1},
        ],
    }
    events, problems = decode(orjson.dumps(frame).decode(), layouts={})
    assert problems == []
    assert events[0] == {
        "eventType": "Greeks",
        "eventSymbol": ".SPY250620C512.5",
        "delta": 0.4,
        "rho": None,
    }
    assert events[1]["bidPrice"] == 511.0


def test_omitted_event_fields_fall_back_to_requested_order() -> None:
    requested = {"Greeks": ("eventSymbol", "time", "delta"), "Quote": ("eventSymbol", "bidPrice")}
    config = dx.parse(
        '{"type":"FEED_CONFIG","channel":3,"dataFormat":"COMPACT","aggregationPeriod":0.1}'
    )
    assert isinstance(config, dx.FeedConfig) and config.event_fields is None
    layouts = dx.field_layouts(requested, config)
    assert layouts == {
        "Greeks": ("eventSymbol", "time", "delta"),
        "Quote": ("eventSymbol", "bidPrice"),
    }
    events, _ = dx.decode_feed_data(["Greeks", [".X250620C5", 7, 0.3]], layouts)
    assert events == [{"eventSymbol": ".X250620C5", "time": 7, "delta": 0.3, "eventType": "Greeks"}]
    # when the server states an order, that order wins over ours
    stated = dx.parse(
        orjson.dumps(
            {
                "type": "FEED_CONFIG",
                "channel": 3,
                "eventFields": {"Greeks": ["delta", "eventSymbol", "time"]},
            }
        ).decode()
    )
    assert isinstance(stated, dx.FeedConfig)
    events, _ = dx.decode_feed_data(
        ["Greeks", [0.3, ".X250620C5", 7]], dx.field_layouts(requested, stated)
    )
    assert events[0]["delta"] == 0.3 and events[0]["eventSymbol"] == ".X250620C5"


def test_several_event_types_in_one_message() -> None:
    layouts = {"Quote": dx.QUOTE_FIELDS, "Greeks": dx.GREEKS_FIELDS}
    data = [
        "Quote",
        ["Quote", "AAPL", 189.9, 190.1],
        "Greeks",
        ["Greeks", ".AAPL250620C190", 0, 0, 2**60 + 1, 5, 5.0, 0.27, 0.5, 0.03, -0.08, 0.04, 0.2],
    ]
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract("AAPL 2025-06-20 C 190", quantity=-2)])
    events, problems = dx.decode_feed_data(data, layouts)
    rows, more = mapper.map(events, RECEIVED)
    assert problems == more == []
    (row,) = rows
    assert row.underlying_price == 190.0
    assert (
        row.mark,
        row.implied_volatility,
        row.delta,
        row.gamma,
        row.theta,
        row.rho,
        row.vega,
    ) == (5.0, 0.27, 0.5, 0.03, -0.08, 0.04, 0.2)
    assert row.broker is Broker.TASTYTRADE and row.quantity == Decimal(-2)
    assert row.contract_key == "AAPL 2025-06-20 C 190"
    assert row.event_time == datetime(1970, 1, 1, 0, 0, 0, 5000, tzinfo=UTC)


def test_index_is_an_exact_64_bit_integer() -> None:
    index = (1718035200 << 32) | (123 << 22) | 7  # > 2**53: a float would round it
    assert index > 2**53
    frame = orjson.dumps(
        {
            "type": "FEED_DATA",
            "channel": 3,
            "data": ["Greeks", [".AAPL250620C190", 0, 0, index, 1718035200123]],
        }
    ).decode()
    layouts = {"Greeks": ("eventSymbol", "eventTime", "eventFlags", "index", "time")}
    events, problems = decode(frame, layouts)
    assert problems == [] and events[0]["index"] == index and type(events[0]["index"]) is int
    events, problems = decode(frame.replace(str(index), "1.8e19"), layouts)
    assert events[0]["index"] is None and "index" in problems[0]


def test_malformed_input_is_reported_not_raised() -> None:
    cases = {
        "{not json": "not valid JSON",
        "[1, 2]": "not a JSON object",
        '{"type": "NOPE", "channel": 0}': "unknown message type",
        '{"type": "KEEPALIVE"}': "channel must be an integer",
        '{"type": "FEED_DATA", "channel": 1, "data": []}': "non-empty list",
        '{"type": "FEED_CONFIG", "channel": 1, "eventFields": {"Greeks": "delta"}}': "field names",
    }
    for frame, reason in cases.items():
        message = dx.parse(frame)
        assert isinstance(message, dx.Malformed) and reason in message.reason, (frame, message)
    _, problems = dx.decode_feed_data(["Greeks", [1, 2, 3]], {"Greeks": ("eventSymbol", "delta")})
    assert problems == ["Greeks: 3 values is not a multiple of 2 fields"]
    _, problems = dx.decode_feed_data(["Trade", ["X", 1]], {})
    assert "no field layout" in problems[0]
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract("A 2025-06-20 C 1", underlying="A")])
    rows, problems = mapper.map(
        [{"eventType": "Greeks", "eventSymbol": ".A250620C1", "delta": "abc", "gamma": True}],
        RECEIVED,
    )
    assert rows[0].delta is None and rows[0].gamma is None and len(problems) == 2


def test_messages_round_trip_through_build_and_parse() -> None:
    messages: list[dx.Outgoing] = [
        dx.Setup(60, 60, dx.CLIENT_VERSION),
        dx.AuthState("AUTHORIZED", "u1"),
        dx.Auth("secret-token"),
        dx.ChannelRequest(1),
        dx.ChannelOpened(1, "FEED", {"contract": "AUTO", "subFormat": "LIST"}),
        dx.ChannelClosed(1),
        dx.ChannelCancel(1),
        dx.FeedSetup(1, dx.ACCEPT_EVENT_FIELDS, "COMPACT", 0.1),
        dx.FeedConfig(1, "COMPACT", 0.1, {"Greeks": dx.GREEKS_FIELDS}),
        dx.FeedConfig(3, "COMPACT", 0.1, None),
        dx.FeedSubscription(1, add=(("Greeks", ".A250620C1"),), reset=True),
        dx.FeedSubscription(1, remove=(("Quote", "A"),)),
        dx.FeedData(1, ["Quote", ["A", 1.0]]),
        dx.Keepalive(),
        dx.Error("TIMEOUT", "no keepalive"),
    ]
    for message in messages:
        assert dx.parse(dx.build(message)) == message


def test_subscriptions_are_chunked_to_about_8_kib() -> None:
    adds = [("Greeks", f".SPXW2512{i % 28 + 1:02d}P{5000 + i}") for i in range(2000)]
    messages = dx.chunk_subscription(1, add=adds, remove=[("Quote", "OLD")], reset=True)
    frames = [dx.build(m) for m in messages]
    assert len(frames) > 5 and all(len(f) <= 8192 for f in frames)
    assert [m.reset for m in messages] == [True] + [False] * (len(messages) - 1)
    assert messages[0].remove == (("Quote", "OLD"),)
    assert [s for m in messages for s in m.add] == adds


SYMBOLS = [
    (
        "AAPL  250620C00190000",
        ".AAPL250620C190",
        ContractKey("AAPL", date(2025, 6, 20), OptionRight.CALL, Decimal(190)),
    ),
    (
        "SPY   250620C00512500",
        ".SPY250620C512.5",
        ContractKey("SPY", date(2025, 6, 20), OptionRight.CALL, Decimal("512.5")),
    ),
    (
        "SPXW  251219P05800000",
        ".SPXW251219P5800",
        ContractKey("SPXW", date(2025, 12, 19), OptionRight.PUT, Decimal(5800)),
    ),
    (
        "BRKB1 260116P00012250",
        ".BRKB1260116P12.25",
        ContractKey("BRKB1", date(2026, 1, 16), OptionRight.PUT, Decimal("12.25")),
    ),
    (
        "2SPY  250103C00000500",
        ".2SPY250103C0.5",
        ContractKey("2SPY", date(2025, 1, 3), OptionRight.CALL, Decimal("0.5")),
    ),
]


@pytest.mark.parametrize(("occ", "streamer", "key"), SYMBOLS)
def test_symbol_mapping_table(occ: str, streamer: str, key: ContractKey) -> None:
    assert dx.parse_occ(occ) == key
    assert dx.parse_streamer_symbol(streamer) == key
    assert dx.streamer_symbol(key) == streamer
    assert dx.occ_symbol(key) == occ
    assert str(dx.parse_streamer_symbol(streamer)) == str(key)


@pytest.mark.parametrize(
    "symbol", ["./EW3N24C4400:XCME", "./ESU4 EW3N4 240719C4400", "AAPL", ".AAPL251320C1", ""]
)
def test_futures_option_or_bad_symbols_raise_symbol_error(symbol: str) -> None:
    """A futures option has no key of its own in either equity form: its key comes from
    `parse_future_option_symbol` and its streamer symbol from the instruments API."""
    with pytest.raises(dx.SymbolError):
        dx.parse_streamer_symbol(symbol)
    with pytest.raises(dx.SymbolError):
        dx.parse_occ(symbol)


def test_keepalive_timer_deadlines() -> None:
    timer = dx.KeepaliveTimer(send_interval=30, receive_timeout=60, last_sent=0, last_received=0)
    assert timer.next_deadline() == 30 and not timer.send_due(29.9) and timer.send_due(30)
    timer.sent(30)
    timer.received(50)
    assert timer.next_deadline() == 60 and not timer.expired(109.9) and timer.expired(110)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "Greeks", "Quote", ".A250620C1"]),
    lambda children: (
        st.lists(children, max_size=12)
        | st.dictionaries(
            st.sampled_from(["type", "channel", "data", "eventFields", "add", "state", "x"])
            | st.text(max_size=5),
            children,
            max_size=6,
        )
    ),
    max_leaves=40,
)
messages = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "FEED_DATA",
                "FEED_CONFIG",
                "FEED_SUBSCRIPTION",
                "SETUP",
                "ERROR",
                "AUTH_STATE",
                "CHANNEL_OPENED",
                "KEEPALIVE",
            ]
        ),
        "channel": st.integers(-2, 5) | st.none(),
    },
    optional={
        "data": json_values,
        "eventFields": json_values,
        "add": json_values,
        "state": json_values,
        "keepaliveTimeout": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(messages, json_values), st.booleans())
def test_random_json_never_raises_out_of_the_decoder(obj: object, as_bytes: bool) -> None:
    frame = json.dumps(obj)
    message = dx.parse(frame.encode() if as_bytes else frame)
    if isinstance(message, dx.FeedData):
        events, _ = dx.decode_feed_data(
            message.data, {"Greeks": ("eventSymbol", "delta", "index"), "Quote": dx.QUOTE_FIELDS}
        )
        mapper = dx.SnapshotMapper()
        mapper.set_contracts([contract("A 2025-06-20 C 1", underlying="A")])
        mapper.map(events, RECEIVED)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise(frame: bytes) -> None:
    assert isinstance(dx.parse(frame), dx.Message)


@pytest.mark.parametrize(
    ("time", "event_time", "expected"),
    [
        (1718035200123, 0, datetime(2024, 6, 10, 16, 0, 0, 123000, tzinfo=UTC)),
        (9000000000001, 0, datetime(2255, 3, 14, 16, 0, 0, 1000, tzinfo=UTC)),
        (0, 1718035200999, datetime(2024, 6, 10, 16, 0, 0, 999000, tzinfo=UTC)),
        (0, 0, RECEIVED),
        (10**18, 0, RECEIVED),
    ],
)
def test_event_time_is_the_exact_millisecond_or_received_at(
    time: int, event_time: int, expected: datetime
) -> None:
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract("A 2025-06-20 C 1", underlying="A")])
    event = {"eventType": "Greeks", "eventSymbol": ".A250620C1", "time": time,
             "eventTime": event_time}  # fmt: skip
    (row,), _ = mapper.map([event], RECEIVED)
    assert row.event_time == expected


def test_setup_timeouts_go_out_as_integers_as_the_spec_types_them() -> None:
    frame = dx.build(dx.Setup(60.0, 60.0, dx.CLIENT_VERSION))
    assert '"keepaliveTimeout":60,"acceptKeepaliveTimeout":60}' in frame
    assert '"keepaliveTimeout":0.5' in dx.build(dx.Setup(0.5, None, dx.CLIENT_VERSION))


def test_feed_config_is_merged_per_event_type() -> None:
    requested = {"Greeks": ("eventSymbol", "delta", "gamma"), "Quote": ("eventSymbol", "bidPrice")}
    greeks_only = dx.FeedConfig(1, "COMPACT", 0.1, {"Greeks": ("gamma", "eventSymbol", "delta")})
    quote_only = dx.FeedConfig(1, "COMPACT", 0.1, {"Quote": ("bidPrice", "eventSymbol")})
    silent = dx.FeedConfig(1, "COMPACT", 0.1, None)
    layouts = dx.merge_feed_config(requested, greeks_only)
    layouts = dx.merge_feed_config(layouts, quote_only)
    layouts = dx.merge_feed_config(layouts, silent)  # a FEED_CONFIG without eventFields
    assert layouts == {
        "Greeks": ("gamma", "eventSymbol", "delta"),  # kept through the Quote-only config
        "Quote": ("bidPrice", "eventSymbol"),
    }
    events, problems = dx.decode_feed_data(
        ["Greeks", [0.03, ".X250620C5", 0.5], "Quote", [189.9, "X"]], layouts
    )
    assert problems == []
    assert (events[0]["delta"], events[0]["gamma"], events[1]["bidPrice"]) == (0.5, 0.03, 189.9)
    assert requested["Greeks"] == ("eventSymbol", "delta", "gamma")  # inputs untouched


def test_greeks_are_requested_with_event_flags_and_index() -> None:
    assert {"eventFlags", "index"} <= set(dx.GREEKS_FIELDS)
    assert dx.ACCEPT_EVENT_FIELDS["Greeks"] == dx.GREEKS_FIELDS


@pytest.mark.parametrize(
    ("flags", "stored"),
    [
        (0, True),
        (dx.TX_PENDING, True),
        (dx.SNAPSHOT_BEGIN, True),
        (dx.SNAPSHOT_END | dx.SNAPSHOT_SNIP, True),
        (None, True),  # "NaN" on the wire
        (True, True),  # not an int: not a flag word
        (dx.REMOVE_EVENT, False),
        (dx.REMOVE_EVENT | dx.SNAPSHOT_END, False),  # an empty snapshot's end marker
        (dx.REMOVE_EVENT | dx.TX_PENDING, False),
    ],
)
def test_remove_event_is_counted_not_stored(flags: object, stored: bool) -> None:
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract("A 2025-06-20 C 1", underlying="A")])
    event = {"eventType": "Greeks", "eventSymbol": ".A250620C1", "eventFlags": flags,
             "index": 7, "time": 1718035200123, "delta": 0.5}  # fmt: skip
    rows, problems = mapper.map([event], RECEIVED)
    assert problems == []
    assert len(rows) == (1 if stored else 0)
    assert mapper.removed_events == (0 if stored else 1)
    assert dx.is_removal(event) is not stored


_HELD = (".A250620C1", ".A250620P1", ".B250620C2")
_FIELD_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**70), 2**70),
    st.none(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "x", *_HELD, "A", "B"]),
    st.booleans(),
    st.just([1]),
)
_GREEKS_LAYOUTS = st.permutations(dx.GREEKS_FIELDS).flatmap(
    lambda fields: st.lists(st.sampled_from(fields), min_size=1, unique=True).map(tuple)
)


@st.composite
def compact_feed_data(draw: st.DrawFn) -> tuple[list[object], dict[str, tuple[str, ...]]]:
    """COMPACT data over random layouts: mostly well-typed Greeks of held and other
    symbols, with any field of any event possibly of another type; Quote and Trade
    groups between them; sometimes a group of the wrong length."""
    layouts = {"Greeks": draw(_GREEKS_LAYOUTS), "Quote": dx.QUOTE_FIELDS, "Trade": dx.TRADE_FIELDS}
    good = {
        "eventSymbol": st.sampled_from([*_HELD, ".C250620C3"]),
        "eventType": st.just("Greeks"),
        "eventFlags": st.sampled_from([0, dx.REMOVE_EVENT, dx.SNAPSHOT_END, None]),
        "index": st.integers(0, 2**63 - 1),
        "time": st.integers(0, 2 * 10**12),
        "eventTime": st.integers(0, 2 * 10**12),
    }
    number = st.floats(-5, 5) | st.integers(-3, 3) | st.just("NaN")
    data: list[object] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["Greeks", "Greeks", "Quote", "Trade"]))
        names = layouts[kind]
        values: list[object] = []
        for _ in range(draw(st.integers(0, 4))):
            for name in names:
                if draw(st.integers(0, 9)) == 0:
                    values.append(draw(_FIELD_VALUES))
                elif name == "eventSymbol" and kind != "Greeks":
                    values.append(draw(st.sampled_from(["A", "B"])))
                else:
                    values.append(draw(good.get(name, number)))
        if draw(st.integers(0, 19)) == 0:
            values.append(0.5)  # misaligned: rejected whole
        data += [kind, values]
    return data, layouts


@settings(max_examples=400, deadline=None)
@given(compact_feed_data())
def test_feed_rows_gives_the_rows_and_problems_of_the_per_event_dicts(
    case: tuple[list[object], dict[str, tuple[str, ...]]],
) -> None:
    """The tick path's column decoder (`SnapshotMapper.feed_rows`) against the per-event
    dicts it replaces (`decode_feed_data`, then `map`): the same rows, the same problems
    in the same order, the same removals, unknown symbols and underlying prices, whatever
    the layout and whatever wrong values the frame holds."""
    data, layouts = case
    held = [contract(str(dx.parse_streamer_symbol(s)), underlying=s[1]) for s in _HELD]
    by_columns, by_dicts = dx.SnapshotMapper(), dx.SnapshotMapper()
    for mapper in (by_columns, by_dicts):
        mapper.set_contracts(held)
    with keeping_payload(False):
        rows, problems = by_columns.feed_rows(data, layouts, RECEIVED)
        events, expected_problems = dx.decode_feed_data(data, layouts)
        expected_rows, mapping = by_dicts.map(events, RECEIVED)
    assert [repr(r) for r in rows] == [repr(r) for r in expected_rows]  # 1.0, not 1
    assert problems == expected_problems + mapping
    assert by_columns.removed_events == by_dicts.removed_events
    assert by_columns.unknown_events == by_dicts.unknown_events
    assert [by_columns.underlying_price(u) for u in "AB"] == [
        by_dicts.underlying_price(u) for u in "AB"
    ]


def test_feed_rows_reads_a_greeks_group_by_its_layout_without_per_event_dicts() -> None:
    """The common frame takes the column path: rows for held symbols only, NaN as None,
    an int Greek as a float, a removal counted; and with payloads kept, each row still
    carries its event."""
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract("A 2025-06-20 C 1", underlying="A")])
    layout = ("eventSymbol", "eventFlags", "time", "delta", "vega", "price")
    removal = dx.REMOVE_EVENT
    data = ["Greeks", [".A250620C1", 0, 1718035200123, 0.5, "NaN", 1,
                       ".X250620C1", 0, 1718035200124, 0.4, 0.1, 2.0,
                       ".A250620C1", removal, 1718035200125, "NaN", "NaN", "NaN"]]  # fmt: skip
    with keeping_payload(False):
        (row,), problems = mapper.feed_rows(data, {"Greeks": layout}, RECEIVED)
    assert problems == [] and mapper.removed_events == 1
    assert (row.delta, row.vega, row.mark, row.rho) == (0.5, None, 1.0, None)
    assert type(row.mark) is float and row.source_payload is None
    assert row.event_time == datetime(2024, 6, 10, 16, 0, 0, 123000, tzinfo=UTC)
    with keeping_payload(True):
        (row,), _ = mapper.feed_rows(data, {"Greeks": layout}, RECEIVED)
    assert row.source_payload is not None and row.source_payload["price"] == 1
