"""DXLink as the server reads and writes it, written from the protocol notes
(`/work/shared/protocols/dxlink.md`) and dxFeed's event catalogue, independent of
greeksd's client (`greeksd.brokers.tastytrade`).

Why separate: a simulator that parses with the client's own parser accepts whatever the
client sends by construction, so it can never catch the client misreading the protocol.
Here every client message is checked field by field against what the server accepts:
known message type, `channel` an integer, every required field present, no unknown
field, each of the right type, and event types / event field names from dxFeed's
catalogue. A violation is a `Violation` carrying the ERROR code the server answers with.

Outgoing messages are plain dicts built by the functions at the bottom; `encode` turns
one into the JSON text that goes on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

SERVER_VERSION = "1.0-greeksd-sim"
USER_ID = "sim-user"
DATA_FORMATS = frozenset({"COMPACT", "FULL"})
CONTRACTS = frozenset({"AUTO", "TICKER", "HISTORY", "STREAM"})
ERROR_CODES = frozenset(
    {"UNKNOWN", "UNSUPPORTED_PROTOCOL", "TIMEOUT", "UNAUTHORIZED", "BAD_ACTION"}
)
EVEN_CHANNEL = "Protocol violation with an even channel usage."

_MARKET = ("eventType", "eventSymbol", "eventTime")
_INDEXED = ("eventFlags", "index", "time", "sequence")

#: dxFeed event types and the field names DXLink knows for each (`acceptEventFields` may
#: name any subset, in any order). The simulator only *produces* Greeks, Quote and Trade;
#: the others are valid to set up and subscribe, they just never carry data here.
EVENT_FIELDS: dict[str, frozenset[str]] = {
    name: frozenset((*_MARKET, *fields))
    for name, fields in {
        "Greeks": (*_INDEXED, "price", "volatility", "delta", "gamma", "theta", "rho", "vega"),
        "Quote": (
            "sequence",
            "timeNanoPart",
            "bidTime",
            "bidExchangeCode",
            "bidPrice",
            "bidSize",
            "askTime",
            "askExchangeCode",
            "askPrice",
            "askSize",
        ),
        "Trade": (
            "time",
            "timeNanoPart",
            "sequence",
            "exchangeCode",
            "price",
            "change",
            "size",
            "dayId",
            "dayVolume",
            "dayTurnover",
            "tickDirection",
            "extendedTradingHours",
        ),
        "Summary": (
            "dayId",
            "dayOpenPrice",
            "dayHighPrice",
            "dayLowPrice",
            "dayClosePrice",
            "dayClosePriceType",
            "prevDayId",
            "prevDayClosePrice",
            "prevDayClosePriceType",
            "prevDayVolume",
            "openInterest",
        ),
        "Profile": (
            "description",
            "shortSaleRestriction",
            "tradingStatus",
            "statusReason",
            "haltStartTime",
            "haltEndTime",
            "highLimitPrice",
            "lowLimitPrice",
            "high52WeekPrice",
            "low52WeekPrice",
            "beta",
            "earningsPerShare",
            "dividendFrequency",
            "exDividendAmount",
            "exDividendDayId",
            "shares",
            "freeFloat",
        ),
        "TheoPrice": (
            *_INDEXED,
            "price",
            "underlyingPrice",
            "delta",
            "gamma",
            "dividend",
            "interest",
        ),
        "Underlying": (
            *_INDEXED,
            "volatility",
            "frontVolatility",
            "backVolatility",
            "callVolume",
            "putVolume",
            "optionVolume",
            "putCallRatio",
        ),
        "TimeAndSale": (
            *_INDEXED,
            "timeNanoPart",
            "exchangeCode",
            "price",
            "size",
            "bidPrice",
            "askPrice",
            "exchangeSaleConditions",
            "tradeThroughExempt",
            "aggressorSide",
            "spreadLeg",
            "extendedTradingHours",
            "validTick",
            "type",
            "buyer",
            "seller",
        ),
        "Candle": (
            *_INDEXED,
            "count",
            "open",
            "high",
            "low",
            "close",
            "volume",
            "vwap",
            "bidVolume",
            "askVolume",
            "impVolatility",
            "openInterest",
        ),
    }.items()
}


class Violation(Exception):
    """A client message the server refuses: `error` is the ERROR code it answers with."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


def _bad(reason: str) -> Violation:
    return Violation("BAD_ACTION", reason)


@dataclass(frozen=True, slots=True)
class Inbound:
    """A client message that passed the checks: its type, channel and whole body."""

    kind: str
    channel: int
    body: dict[str, Any]


# ------------------------------------------------------------------ field checks
# Each check gets (message type, field name, value) and raises Violation when wrong.

Check = Callable[[str, str, Any], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and value == value


def _string(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise _bad(f"{kind}.{name} must be a non-empty string")


def _timeout(kind: str, name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise _bad(f"{kind}.{name} must be a positive number of seconds")


def _period(kind: str, name: str, value: Any) -> None:
    if not _is_number(value) or value < 0:
        raise _bad(f"{kind}.{name} must be a number of seconds >= 0")


def _boolean(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _bad(f"{kind}.{name} must be true or false")


def _data_format(kind: str, name: str, value: Any) -> None:
    if value not in DATA_FORMATS:
        raise _bad(f"{kind}.{name} must be one of {sorted(DATA_FORMATS)}")


def _parameters(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _bad(f"{kind}.{name} must be an object")
    unknown = set(value) - {"contract"}
    if unknown:
        raise _bad(f"{kind}.{name} has unknown keys {sorted(unknown)}")
    if value.get("contract") not in CONTRACTS:
        raise _bad(f"{kind}.{name}.contract must be one of {sorted(CONTRACTS)}")


def _event_type(kind: str, name: str, value: Any) -> None:
    if value not in EVENT_FIELDS:
        raise _bad(f"{kind}.{name}: unknown event type {value!r:.40}")


def _event_fields(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, dict) or not value:
        raise _bad(f"{kind}.{name} must be an object of event type -> field names")
    for event_type, names in value.items():
        _event_type(kind, name, event_type)
        if not isinstance(names, list) or not names:
            raise _bad(f"{kind}.{name}.{event_type} must be a non-empty list of field names")
        unknown = [n for n in names if n not in EVENT_FIELDS[event_type]]
        if unknown:
            raise _bad(f"{kind}.{name}.{event_type}: unknown fields {unknown!r:.80}")
        if len(set(names)) != len(names):
            raise _bad(f"{kind}.{name}.{event_type} repeats a field")


def _millis(kind: str, name: str, value: Any) -> None:
    if not _is_int(value):
        raise _bad(f"{kind}.{name} must be an integer (ms since the epoch)")


_SUBSCRIPTION_KEYS: dict[str, Check] = {"type": _event_type, "symbol": _string}
_SUBSCRIPTION_OPTIONAL: dict[str, Check] = {"fromTime": _millis, "source": _string}


def _subscriptions(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise _bad(f"{kind}.{name} must be a list of {{type, symbol}} objects")
    for item in value:
        if not isinstance(item, dict):
            raise _bad(f"{kind}.{name} items must be objects")
        _check_fields(f"{kind}.{name}[]", item, _SUBSCRIPTION_KEYS, _SUBSCRIPTION_OPTIONAL)


def _free_text(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _bad(f"{kind}.{name} must be a string")


@dataclass(frozen=True, slots=True)
class _Schema:
    required: Mapping[str, Check]
    optional: Mapping[str, Check]
    connection_level: bool  # must use channel 0


#: What a client may send, per message type. Messages only a server sends (AUTH_STATE,
#: CHANNEL_OPENED, FEED_CONFIG, FEED_DATA...) are a BAD_ACTION from a client.
CLIENT_SCHEMAS: dict[str, _Schema] = {
    "SETUP": _Schema(
        {"version": _string},
        {"keepaliveTimeout": _timeout, "acceptKeepaliveTimeout": _timeout},
        True,
    ),
    "AUTH": _Schema({"token": _string}, {}, True),
    "KEEPALIVE": _Schema({}, {}, True),
    "ERROR": _Schema({"error": _string, "message": _free_text}, {}, False),
    "CHANNEL_REQUEST": _Schema({"service": _string, "parameters": _parameters}, {}, False),
    "CHANNEL_CANCEL": _Schema({}, {}, False),
    "FEED_SETUP": _Schema(
        {},
        {
            "acceptAggregationPeriod": _period,
            "acceptDataFormat": _data_format,
            "acceptEventFields": _event_fields,
        },
        False,
    ),
    "FEED_SUBSCRIPTION": _Schema(
        {}, {"add": _subscriptions, "remove": _subscriptions, "reset": _boolean}, False
    ),
}
SERVER_ONLY = frozenset(
    {"AUTH_STATE", "CHANNEL_OPENED", "CHANNEL_CLOSED", "FEED_CONFIG", "FEED_DATA"}
)


def _check_fields(
    kind: str, obj: Mapping[str, Any], required: Mapping[str, Check], optional: Mapping[str, Check]
) -> None:
    for name, check in required.items():
        if name not in obj:
            raise _bad(f"{kind} without {name}")
        check(kind, name, obj[name])
    for name, value in obj.items():
        if name in required:
            continue
        if name not in optional:
            raise _bad(f"{kind}: unknown field {name!r:.40}")
        optional[name](kind, name, value)


def decode(frame: str | bytes) -> dict[str, Any]:
    """The JSON object in one frame; a Violation when it is not one."""
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise _bad("message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _bad("message is not a JSON object")
    return obj


def validate(obj: Mapping[str, Any]) -> Inbound:
    """Check one decoded client message against `CLIENT_SCHEMAS`."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _bad("message without a string type")
    if kind in SERVER_ONLY:
        raise _bad(f"{kind} is a server message")
    schema = CLIENT_SCHEMAS.get(kind)
    if schema is None:
        raise Violation("UNSUPPORTED_PROTOCOL", f"unknown message type {kind!r:.40}")
    if "channel" not in obj:
        raise _bad(f"{kind} without channel")
    channel = obj["channel"]
    if not _is_int(channel) or channel < 0:
        raise _bad(f"{kind}.channel must be an integer >= 0")
    if schema.connection_level and channel != 0:
        raise _bad(f"{kind} belongs on channel 0")
    body = {k: v for k, v in obj.items() if k not in ("type", "channel")}
    _check_fields(kind, body, schema.required, schema.optional)
    return Inbound(kind, channel, dict(obj))


# ------------------------------------------------------------------ server messages


def encode(message: Mapping[str, Any]) -> str:
    return orjson.dumps(message).decode()


def setup(keepalive_timeout: float, accept_keepalive_timeout: float) -> dict[str, Any]:
    return {
        "type": "SETUP",
        "channel": 0,
        "version": SERVER_VERSION,
        "keepaliveTimeout": keepalive_timeout,
        "acceptKeepaliveTimeout": accept_keepalive_timeout,
    }


def auth_state(authorized: bool) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "AUTH_STATE",
        "channel": 0,
        "state": "AUTHORIZED" if authorized else "UNAUTHORIZED",
    }
    if authorized:
        message["userId"] = USER_ID
    return message


def error(code: str, text: str) -> dict[str, Any]:
    """An ERROR with one of the codes the protocol defines (a typo here would teach a
    client to expect a code no real server sends)."""
    if code not in ERROR_CODES:
        raise ValueError(f"DXLink has no ERROR code {code!r}")
    return {"type": "ERROR", "channel": 0, "error": code, "message": text}


def keepalive() -> dict[str, Any]:
    return {"type": "KEEPALIVE", "channel": 0}


def channel_opened(channel: int, contract: str) -> dict[str, Any]:
    return {
        "type": "CHANNEL_OPENED",
        "channel": channel,
        "service": "FEED",
        "parameters": {"contract": contract, "subFormat": "LIST"},
    }


def channel_closed(channel: int) -> dict[str, Any]:
    return {"type": "CHANNEL_CLOSED", "channel": channel}


def feed_config(
    channel: int,
    data_format: str,
    aggregation_period: float,
    event_fields: Mapping[str, Sequence[str]] | None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "FEED_CONFIG",
        "channel": channel,
        "dataFormat": data_format,
        "aggregationPeriod": aggregation_period,
    }
    if event_fields is not None:
        message["eventFields"] = {k: list(v) for k, v in event_fields.items()}
    return message


def feed_data(channel: int, data: list[Any]) -> dict[str, Any]:
    return {"type": "FEED_DATA", "channel": channel, "data": data}


def compact(groups: Iterable[tuple[str, Sequence[str], Sequence[Mapping[str, Any]]]]) -> list[Any]:
    """COMPACT `data`: per (event type, field order, events) the type name, then one flat
    list with every event's values in that order, back to back. A field the event does
    not have goes out as null."""
    data: list[Any] = []
    for event_type, names, events in groups:
        if events:
            data.append(event_type)
            data.append([event.get(name) for event in events for name in names])
    return data


def full(groups: Iterable[tuple[str, Sequence[str], Sequence[Mapping[str, Any]]]]) -> list[Any]:
    """FULL `data`: one object per event with `eventType` and the requested fields."""
    return [
        {"eventType": event_type, **{name: event.get(name) for name in names}}
        for event_type, names, events in groups
        for event in events
    ]
