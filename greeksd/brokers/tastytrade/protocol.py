"""Sans-I/O DXLink: JSON frames in, typed messages out; messages in, JSON frames out;
and the mapping of what Tastytrade's REST API answers (positions, transactions) to
greeksd's model.

No sockets and no clocks (times are passed in), so the same code serves the client
stream, the probe and tests with recorded frames (the simulator speaks the server side
with its own code, greeksd.sim.dxlink_wire). `parse` never raises: anything it
cannot make sense of becomes a `Malformed` message carrying the reason. FEED_DATA is the
hot path: `SnapshotMapper.feed_rows` turns COMPACT Greeks straight into `Snapshot` rows,
a column of values at a time, with no per-event object; everything else becomes plain
dicts (`decode_feed_data`, one `dict(zip(...))` per event) that `SnapshotMapper.map` reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from itertools import chain, repeat
from typing import Any

import orjson

from greeksd.model import (
    FUTURE_MONTHS,
    KEEP_PAYLOAD,
    Broker,
    Contract,
    ContractKey,
    OptionRight,
    Snapshot,
    Trade,
    canonical_future,
    format_strike,
)

CLIENT_VERSION = "0.1-DXF-JS/0.3.0"
NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})
SUBSCRIPTION_CHUNK_BYTES = 8192

#: What greeksd asks for: the fields it stores, plus identity, time, and the two that
#: say what an event *is* (as the SDK and dxFeed's own clients request them): `eventFlags`
#: (a REMOVE_EVENT is a removal, not a tick) and `index` (which event a removal or a
#: snapshot refers to; kept in `source_payload`).
GREEKS_FIELDS = (
    "eventType",
    "eventSymbol",
    "eventTime",
    "eventFlags",
    "index",
    "time",
    "price",
    "volatility",
    "delta",
    "gamma",
    "theta",
    "rho",
    "vega",
)
QUOTE_FIELDS = ("eventType", "eventSymbol", "bidPrice", "askPrice")
TRADE_FIELDS = ("eventType", "eventSymbol", "price")
ACCEPT_EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "Greeks": GREEKS_FIELDS,
    "Quote": QUOTE_FIELDS,
    "Trade": TRADE_FIELDS,
}

#: dxFeed `eventFlags` bits (IndexedEvent). Only REMOVE_EVENT changes what greeksd does:
#: such an event says "the event at this index is gone" and carries no Greeks (its values
#: are NaN), so it is counted, never stored as a tick. TX_PENDING and the SNAPSHOT_* bits
#: mark transactions and snapshot boundaries of events that do carry real values: those
#: are stored like any other event (a snapshot's end marker that is also a removal, as an
#: empty snapshot's is, is a removal).
TX_PENDING = 0x01
REMOVE_EVENT = 0x02
SNAPSHOT_BEGIN = 0x04
SNAPSHOT_END = 0x08
SNAPSHOT_SNIP = 0x10

Subscription = tuple[str, str]
"""(event type, symbol), e.g. ("Greeks", ".AAPL250620C190")."""

FeedEvent = dict[str, Any]
"""One market event: field name -> value, always with `eventType` and `eventSymbol`;
non-finite values are None."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Setup:
    keepalive_timeout: float | None
    accept_keepalive_timeout: float | None
    version: str
    channel: int = 0

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "SETUP", "channel": self.channel, "version": self.version}
        if self.keepalive_timeout is not None:
            out["keepaliveTimeout"] = _seconds(self.keepalive_timeout)
        if self.accept_keepalive_timeout is not None:
            out["acceptKeepaliveTimeout"] = _seconds(self.accept_keepalive_timeout)
        return out


def _seconds(value: float) -> float:
    """The protocol's timeouts are whole seconds, written `60` (as dxFeed's clients do),
    not `60.0`; a fraction (only tests use one) is sent as it is."""
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True, slots=True)
class AuthState:
    state: str
    user_id: str | None = None
    channel: int = 0

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "AUTH_STATE", "channel": self.channel, "state": self.state}
        if self.user_id is not None:
            out["userId"] = self.user_id
        return out


@dataclass(frozen=True, slots=True)
class Auth:
    token: str = field(repr=False)
    channel: int = 0

    def wire(self) -> dict[str, Any]:
        return {"type": "AUTH", "channel": self.channel, "token": self.token}


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    channel: int
    service: str = "FEED"
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"contract": "AUTO"})

    def wire(self) -> dict[str, Any]:
        return {
            "type": "CHANNEL_REQUEST",
            "channel": self.channel,
            "service": self.service,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    channel: int
    service: str = "FEED"
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {
            "type": "CHANNEL_OPENED",
            "channel": self.channel,
            "service": self.service,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    channel: int

    def wire(self) -> dict[str, Any]:
        return {"type": "CHANNEL_CLOSED", "channel": self.channel}


@dataclass(frozen=True, slots=True)
class ChannelCancel:
    channel: int

    def wire(self) -> dict[str, Any]:
        return {"type": "CHANNEL_CANCEL", "channel": self.channel}


@dataclass(frozen=True, slots=True)
class FeedSetup:
    channel: int
    event_fields: Mapping[str, tuple[str, ...]] | None
    data_format: str | None = "COMPACT"
    aggregation_period: float | None = 0.1

    def wire(self) -> dict[str, Any]:
        return _feed_wire("FEED_SETUP", "accept", self)


@dataclass(frozen=True, slots=True)
class FeedConfig:
    channel: int
    data_format: str | None
    aggregation_period: float | None
    event_fields: Mapping[str, tuple[str, ...]] | None

    def wire(self) -> dict[str, Any]:
        return _feed_wire("FEED_CONFIG", "", self)


def _feed_wire(kind: str, prefix: str, m: FeedSetup | FeedConfig) -> dict[str, Any]:
    """FEED_SETUP asks (`acceptDataFormat`…), FEED_CONFIG answers (`dataFormat`…): the
    same three optional fields under two spellings."""

    def key(name: str) -> str:
        return prefix + name[0].upper() + name[1:] if prefix else name

    out: dict[str, Any] = {"type": kind, "channel": m.channel}
    if m.aggregation_period is not None:
        out[key("aggregationPeriod")] = m.aggregation_period
    if m.data_format is not None:
        out[key("dataFormat")] = m.data_format
    if m.event_fields is not None:
        out[key("eventFields")] = {k: list(v) for k, v in m.event_fields.items()}
    return out


@dataclass(frozen=True, slots=True)
class FeedSubscription:
    channel: int
    add: tuple[Subscription, ...] = ()
    remove: tuple[Subscription, ...] = ()
    reset: bool = False

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "FEED_SUBSCRIPTION", "channel": self.channel}
        if self.reset:
            out["reset"] = True
        if self.add:
            out["add"] = [{"type": t, "symbol": s} for t, s in self.add]
        if self.remove:
            out["remove"] = [{"type": t, "symbol": s} for t, s in self.remove]
        return out


@dataclass(frozen=True, slots=True)
class FeedData:
    """`data` stays raw until `decode_feed_data`, which needs the channel's layout."""

    channel: int
    data: list[Any]

    def wire(self) -> dict[str, Any]:
        return {"type": "FEED_DATA", "channel": self.channel, "data": self.data}


@dataclass(frozen=True, slots=True)
class Keepalive:
    channel: int = 0

    def wire(self) -> dict[str, Any]:
        return {"type": "KEEPALIVE", "channel": self.channel}


@dataclass(frozen=True, slots=True)
class Error:
    error: str
    message: str
    channel: int = 0

    def wire(self) -> dict[str, Any]:
        return {
            "type": "ERROR",
            "channel": self.channel,
            "error": self.error,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame `parse` rejected; `excerpt` is the start of the frame, for the log."""

    reason: str
    excerpt: str = ""


Outgoing = (
    Setup
    | AuthState
    | Auth
    | ChannelRequest
    | ChannelOpened
    | ChannelClosed
    | ChannelCancel
    | FeedSetup
    | FeedConfig
    | FeedSubscription
    | FeedData
    | Keepalive
    | Error
)
# Everything a peer may send, plus what a frame that is neither becomes.
Message = Outgoing | Malformed


def build(message: Outgoing) -> str:
    return orjson.dumps(message.wire()).decode()


# --------------------------------------------------------------------------- parsing


class _Invalid(ValueError):
    """Internal: a field has the wrong shape; `parse` turns it into Malformed."""


def _none(_: str) -> None:
    return None


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if value - value == 0.0 else None


def _loads(frame: str | bytes) -> Any:
    """orjson first (fast, exact 64-bit ints); the stdlib only for frames orjson refuses,
    such as bare NaN/Infinity tokens, which it maps to None."""
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError:
        return json.loads(frame, parse_constant=_none, parse_float=_finite_float)


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if value.__class__ is not int:
        raise _Invalid(f"{key} must be an integer, got {value!r:.40}")
    return value  # type: ignore[no-any-return]


def _str(obj: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise _Invalid(f"{key} must be a string, got {value!r:.40}")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return None if value is None else _str(obj, key)


def _opt_number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if value.__class__ not in (int, float):
        raise _Invalid(f"{key} must be a number, got {value!r:.40}")
    return value  # type: ignore[no-any-return]


def _dict(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise _Invalid(f"{key} must be an object")
    return value


def _fields(obj: Mapping[str, Any], key: str) -> dict[str, tuple[str, ...]] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(f"{key} must be an object of field lists")
    out: dict[str, tuple[str, ...]] = {}
    for event_type, names in value.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _Invalid(f"{key}.{event_type} must be a list of field names")
        if not names or len(set(names)) != len(names):
            raise _Invalid(f"{key}.{event_type} must list distinct field names")
        out[event_type] = tuple(names)
    return out


def _subscriptions(obj: Mapping[str, Any], key: str) -> tuple[Subscription, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Invalid(f"{key} must be a list")
    out: list[Subscription] = []
    for item in value:
        if not isinstance(item, dict):
            raise _Invalid(f"{key} items must be objects")
        out.append((_str(item, "type"), _str(item, "symbol")))
    return tuple(out)


def _parse_feed_data(obj: Mapping[str, Any], channel: int) -> FeedData:
    data = obj.get("data")
    if not isinstance(data, list) or not data:
        raise _Invalid("FEED_DATA data must be a non-empty list")
    return FeedData(channel, data)


_PARSERS: dict[str, Any] = {
    "FEED_DATA": _parse_feed_data,
    "KEEPALIVE": lambda obj, ch: Keepalive(ch),
    "SETUP": lambda obj, ch: Setup(
        _opt_number(obj, "keepaliveTimeout"),
        _opt_number(obj, "acceptKeepaliveTimeout"),
        _str(obj, "version", ""),
        ch,
    ),
    "AUTH_STATE": lambda obj, ch: AuthState(_str(obj, "state"), _opt_str(obj, "userId"), ch),
    "AUTH": lambda obj, ch: Auth(_str(obj, "token"), ch),
    "CHANNEL_REQUEST": lambda obj, ch: ChannelRequest(
        ch, _str(obj, "service"), _dict(obj, "parameters")
    ),
    "CHANNEL_OPENED": lambda obj, ch: ChannelOpened(
        ch, _str(obj, "service", ""), _dict(obj, "parameters")
    ),
    "CHANNEL_CLOSED": lambda obj, ch: ChannelClosed(ch),
    "CHANNEL_CANCEL": lambda obj, ch: ChannelCancel(ch),
    "FEED_SETUP": lambda obj, ch: FeedSetup(
        ch,
        _fields(obj, "acceptEventFields"),
        _opt_str(obj, "acceptDataFormat"),
        _opt_number(obj, "acceptAggregationPeriod"),
    ),
    "FEED_CONFIG": lambda obj, ch: FeedConfig(
        ch,
        _opt_str(obj, "dataFormat"),
        _opt_number(obj, "aggregationPeriod"),
        _fields(obj, "eventFields"),
    ),
    "FEED_SUBSCRIPTION": lambda obj, ch: FeedSubscription(
        ch, _subscriptions(obj, "add"), _subscriptions(obj, "remove"), obj.get("reset") is True
    ),
    "ERROR": lambda obj, ch: Error(_str(obj, "error", "UNKNOWN"), _str(obj, "message", ""), ch),
}


def parse(frame: str | bytes) -> Message:
    """One websocket frame -> one message. Never raises."""
    try:
        obj = _loads(frame)
    except (ValueError, RecursionError):
        return Malformed("not valid JSON", _excerpt(frame))
    if not isinstance(obj, dict):
        return Malformed("not a JSON object", _excerpt(frame))
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        return Malformed(f"unknown message type {kind!r:.40}", _excerpt(frame))
    try:
        channel = _int(obj, "channel")
        if channel < 0:
            raise _Invalid("channel must not be negative")
        return parser(obj, channel)  # type: ignore[no-any-return]
    except _Invalid as exc:
        return Malformed(f"{kind}: {exc}", _excerpt(frame))


def _excerpt(frame: str | bytes, limit: int = 200) -> str:
    text = frame if isinstance(frame, str) else frame[:limit].decode("utf-8", "replace")
    return text[:limit]


# --------------------------------------------------------------------------- FEED_DATA


def merge_feed_config(
    layouts: Mapping[str, Sequence[str]], config: FeedConfig | None
) -> dict[str, tuple[str, ...]]:
    """The field order COMPACT data follows after `config`: each event type it names
    takes the order it states; every other type keeps the order known before.

    The server may send FEED_CONFIG again "if the configuration has changed", naming one
    event type only (dxFeed's own client merges it the same way), and the real server
    may omit `eventFields` altogether: then nothing changes. So start from the order we
    asked for and merge every FEED_CONFIG of the channel in turn; rebuilding from the
    request and the latest FEED_CONFIG alone would decode the other types by a stale
    order (swapped delta/gamma, or every event rejected)."""
    merged = {k: tuple(v) for k, v in layouts.items()}
    if config is not None and config.event_fields:
        merged.update(config.event_fields)
    return merged


def field_layouts(
    requested: Mapping[str, Sequence[str]], config: FeedConfig | None
) -> dict[str, tuple[str, ...]]:
    """The layouts after the first FEED_CONFIG of a channel: its order where it states
    one, else the order we asked for."""
    return merge_feed_config(requested, config)


def _clean_full(item: dict[str, Any]) -> FeedEvent:
    return {k: None if (v.__class__ is str and v in NON_FINITE) else v for k, v in item.items()}


def decode_feed_data(
    data: list[Any], layouts: Mapping[str, Sequence[str]]
) -> tuple[list[FeedEvent], list[str]]:
    """Raw FEED_DATA `data` (COMPACT or FULL) -> (events, problems). Never raises.

    A COMPACT group `"Greeks", [v1 .. vN, v1 .. vN, ...]` holds any number of events of
    one type back to back, each `len(layout)` values long; a group whose length is not a
    multiple is rejected whole, since its alignment (hence every value) is unknowable.
    (The tick path builds rows without these per-event dicts: `SnapshotMapper.feed_rows`.)
    """
    events: list[FeedEvent] = []
    problems: list[str] = []
    if data and isinstance(data[0], dict):
        for item in data:
            if not isinstance(item, dict):
                problems.append("FULL data item is not an object")
                continue
            if not isinstance(item.get("eventType"), str):
                problems.append("FULL event without eventType")
                continue
            _append_event(events, problems, _clean_full(item))
        return events, problems
    for event_type, values, names in compact_groups(data, layouts, problems):
        _decode_group(event_type, values, names, events, problems)
    return events, problems


def compact_groups(
    data: list[Any], layouts: Mapping[str, Sequence[str]], problems: list[str]
) -> Iterator[tuple[str, list[Any], Sequence[str]]]:
    """COMPACT data's groups that can be decoded, as (event type, values, layout); why
    each other one cannot is appended to `problems`."""
    if len(data) % 2:
        problems.append("COMPACT data must alternate event type and value list")
    for i in range(0, len(data) - 1, 2):
        event_type, values = data[i], data[i + 1]
        if not isinstance(event_type, str) or not isinstance(values, list):
            problems.append(f"COMPACT group {i // 2} is not (type, list)")
            continue
        names = layouts.get(event_type)
        if not names:
            problems.append(f"no field layout for event type {event_type!r:.40}")
            continue
        if len(values) % len(names):
            problems.append(
                f"{event_type}: {len(values)} values is not a multiple of {len(names)} fields"
            )
            continue
        yield event_type, values, names


def _decode_group(
    event_type: str,
    values: list[Any],
    names: Sequence[str],
    events: list[FeedEvent],
    problems: list[str],
) -> None:
    """One COMPACT group's events as dicts, appended to `events`."""
    width = len(names)
    try:  # hashing each value once beats three scans of == against strings
        dirty = not NON_FINITE.isdisjoint(values)
    except TypeError:  # an unhashable value (a list, an object) in a bad frame
        dirty = "NaN" in values or "Infinity" in values or "-Infinity" in values
    indexed = "index" in names
    append = events.append
    # The `_append_event` checks, inlined: this loop runs once per market event.
    for start in range(0, len(values), width):
        event = dict(zip(names, values[start : start + width], strict=False))
        if dirty:
            event = _clean_full(event)
        event["eventType"] = event_type
        if event.get("eventSymbol").__class__ is not str:
            problems.append(f"{event_type} event without a string eventSymbol")
            continue
        if indexed and event["index"].__class__ is not int:
            _check_index(event, problems)
        append(event)


def _append_event(events: list[FeedEvent], problems: list[str], event: FeedEvent) -> None:
    if not isinstance(event.get("eventSymbol"), str):
        problems.append(f"{event['eventType']} event without a string eventSymbol")
        return
    if "index" in event and event["index"].__class__ is not int:
        _check_index(event, problems)
    events.append(event)


def is_removal(event: FeedEvent) -> bool:
    """The event is flagged REMOVE_EVENT: a removal, not a value (`SnapshotMapper` inlines
    this test on its hot path)."""
    flags = event.get("eventFlags")
    return flags.__class__ is int and bool(flags & REMOVE_EVENT)  # type: ignore[operator]


def _check_index(event: FeedEvent, problems: list[str]) -> None:
    """A non-int index is stored as None (and reported unless it was null)."""
    index = event["index"]
    if index is not None:
        problems.append(f"{event['eventSymbol']}: index {index!r:.40} is not a 64-bit int")
    event["index"] = None


def chunk_subscription(
    channel: int,
    *,
    add: Sequence[Subscription] = (),
    remove: Sequence[Subscription] = (),
    reset: bool = False,
    max_bytes: int = SUBSCRIPTION_CHUNK_BYTES,
) -> list[FeedSubscription]:
    """Split a subscription change into messages of about `max_bytes` each: the server
    refuses very large ones (close 1009). Removals go first; `reset` rides on the first
    message only."""
    messages: list[FeedSubscription] = []
    overhead = 90
    for kind, items in (("remove", remove), ("add", add)):
        batch: list[Subscription] = []
        size = overhead
        for item in items:
            item_size = len(item[0]) + len(item[1]) + 30
            if batch and size + item_size > max_bytes:
                messages.append(_subscription(channel, kind, batch, reset and not messages))
                batch, size = [], overhead
            batch.append(item)
            size += item_size
        if batch:
            messages.append(_subscription(channel, kind, batch, reset and not messages))
    if reset and not messages:
        messages.append(FeedSubscription(channel, reset=True))
    return messages


def _subscription(
    channel: int, kind: str, batch: list[Subscription], reset: bool
) -> FeedSubscription:
    items = tuple(batch)
    if kind == "add":
        return FeedSubscription(channel, add=items, reset=reset)
    return FeedSubscription(channel, remove=items, reset=reset)


# --------------------------------------------------------------------------- keepalive


@dataclass(slots=True)
class KeepaliveTimer:
    """Both halves of DXLink liveness, on a clock the caller supplies.

    We must send *something* at least every `send_interval` (half the peer's announced
    timeout), and a peer silent for `receive_timeout` is a dead link even if TCP says
    otherwise (a half-open connection never errors by itself).
    """

    send_interval: float
    receive_timeout: float
    last_sent: float
    last_received: float

    def sent(self, now: float) -> None:
        self.last_sent = now

    def received(self, now: float) -> None:
        self.last_received = now

    def send_due(self, now: float) -> bool:
        return now >= self.last_sent + self.send_interval

    def expired(self, now: float) -> bool:
        return now >= self.last_received + self.receive_timeout

    def next_deadline(self) -> float:
        return min(self.last_sent + self.send_interval, self.last_received + self.receive_timeout)


# --------------------------------------------------------------------------- symbols


class SymbolError(ValueError):
    """A symbol greeksd cannot map to a ContractKey; the message says why."""


_STREAMER = re.compile(r"\.([A-Z0-9]+)(\d{6})([CP])(\d+(?:\.\d+)?)")
_MILLI = Decimal("0.001")


def _expiry(yymmdd: str, symbol: str) -> date:
    try:
        return date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:]))
    except ValueError:
        raise SymbolError(f"bad expiration {yymmdd!r} in {symbol!r}") from None


def _strike(text: str, symbol: str) -> Decimal:
    value = Decimal(text)
    if value <= 0:
        raise SymbolError(f"bad strike in {symbol!r}")
    return value


def parse_streamer_symbol(symbol: str) -> ContractKey:
    """`.AAPL250620C190` / `.SPY250620C512.5` / `.SPXW251219P5800` -> ContractKey. A
    futures option's streamer symbol (`./EW3Z25C6000:XCME`) does not name its future, so
    it maps to a key only through the instrument it came from (`SnapshotMapper`)."""
    if symbol.startswith("./"):
        raise SymbolError(f"futures option {symbol!r} has no key of its own")
    match = _STREAMER.fullmatch(symbol)
    if match is None:
        raise SymbolError(f"not an option streamer symbol: {symbol!r}")
    root, yymmdd, right, strike = match.groups()
    return ContractKey(root, _expiry(yymmdd, symbol), OptionRight(right), _strike(strike, symbol))


def streamer_symbol(key: ContractKey) -> str:
    """An equity/index option's streamer symbol; a futures option's comes from the
    instruments API (`FeedSymbols`), never from here."""
    if key.future:
        raise SymbolError(f"{key} is a futures option: its streamer symbol comes from the API")
    return f".{key.root}{key.expiration:%y%m%d}{key.right.value}{format_strike(key.strike)}"


def parse_occ(symbol: str) -> ContractKey:
    """`AAPL  250620C00190000` (root padded to 6, strike x1000 in 8 digits) -> key."""
    if symbol.startswith("/") or symbol.startswith("./"):
        raise SymbolError(f"{symbol!r} is a futures option, not an OCC symbol")
    try:
        return ContractKey.from_occ(symbol)
    except ValueError as exc:
        raise SymbolError(str(exc)) from None


def occ_symbol(key: ContractKey) -> str:
    try:
        milli = (key.strike / _MILLI).to_integral_exact()
    except InvalidOperation:
        raise SymbolError(f"strike {key.strike} does not fit an OCC symbol") from None
    if milli != key.strike / _MILLI or not 0 < milli < 10**8 or len(key.root) > 6:
        raise SymbolError(f"{key} does not fit an OCC symbol")
    return f"{key.root:<6}{key.expiration:%y%m%d}{key.right.value}{int(milli):08d}"


# Tastytrade's futures option symbol, fixed width: './', the future (root, month code,
# one-digit year) padded to 5, the option contract code (product, month code, one-digit
# year) padded to 5, a space, YYMMDD, C|P, the strike without trailing zeros. Real ones:
# './ESZ5 EW3Z5 251219C6000', './GCV5 OGV5  250925P2755' (two spaces),
# './MESM6EX3H6 260320P6450' (none). Sources: tasty-go option_chains_test.go /
# futures_test.go (github.com/laustindasauce/tasty-go), QuantConnect
# Lean.Brokerages.Tastytrade PR 12, and live positions quoted in tests/test_identity.py.
_FUTURE_OPTION = re.compile(r"\./([A-Z0-9 ]{5})([A-Z0-9 ]{5}) (\d{6})([CP])(\d+(?:\.\d+)?)")
_CONTRACT_CODE = re.compile(r"([A-Z0-9]+?)[" + FUTURE_MONTHS + r"]\d")
# dxFeed's futures option symbol: './', product, month code, two-digit year, C|P, strike,
# ':' and the exchange's MIC ('./EW3Z25C6000:XCME', './OZNG26P111:XCBT').
_FUTURE_OPTION_STREAMER = re.compile(
    r"\./([A-Z0-9]+?)[" + FUTURE_MONTHS + r"]\d\d([CP])(\d+(?:\.\d+)?):([A-Z0-9]+)"
)
#: The MIC on dxFeed's futures symbols -> the exchange IBKR and CME name (`Contract.exchange`).
EXCHANGE_OF_MIC = {"XCME": "CME", "XCBT": "CBOT", "XNYM": "NYMEX", "XCEC": "COMEX"}


def parse_future_option_symbol(symbol: str) -> ContractKey:
    """`./ESZ5 EW3Z5 251219C6000` -> `/ESZ25 EW3 2025-12-19 C 6000`: the product is the
    option contract code without its month code and year digit (CME's code, which IBKR
    calls the trading class), the expiration the symbol's YYMMDD (Tastytrade's
    `expiration-date`), the future its canonical code."""
    match = _FUTURE_OPTION.fullmatch(symbol)
    if match is None:
        raise SymbolError(f"not a Tastytrade futures option symbol: {symbol!r}")
    future, code, yymmdd, right, strike = match.groups()
    future, code = future.rstrip(" "), code.rstrip(" ")
    product = _CONTRACT_CODE.fullmatch(code)
    if " " in future or product is None:
        raise SymbolError(f"bad future or option code in {symbol!r}")
    expiration = _expiry(yymmdd, symbol)
    try:
        canonical = canonical_future(future, not_before=expiration)
        return ContractKey(
            product.group(1), expiration, OptionRight(right), _strike(strike, symbol), canonical
        )
    except ValueError as exc:
        raise SymbolError(f"{symbol!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class FeedSymbols:
    """Where a futures option's data is on DXLink, as the instruments API names it: its
    own streamer symbol and its future's (whose Quote/Trade price the rows carry)."""

    option: str
    future: str


class Unsupported(ValueError):
    """A held position greeksd cannot stream; the message is the reason status counts."""


def future_option_feed(
    key: ContractKey, streamer: str, future_streamer: str
) -> tuple[FeedSymbols, str]:
    """The feed symbols of the futures option `key` (from its position symbol) and its
    exchange, once the instruments API's `streamer-symbol`s are checked against the key:
    a streamer symbol naming another product, right or strike is refused, never
    streamed under the wrong key. Raises `Unsupported`."""
    match = _FUTURE_OPTION_STREAMER.fullmatch(streamer)
    if match is None:
        raise Unsupported("futures option streamer symbol not understood")
    product, right, strike, mic = match.groups()
    if (product, right, Decimal(strike)) != (key.root, key.right.value, key.strike):
        raise Unsupported("futures option streamer symbol does not match the position")
    try:
        future = canonical_future(future_streamer, not_before=key.expiration)
    except ValueError:
        raise Unsupported("future streamer symbol not understood") from None
    if future != key.future:
        raise Unsupported("future streamer symbol does not match the position")
    return FeedSymbols(streamer, future_streamer), EXCHANGE_OF_MIC.get(mic, "")


# --------------------------------------------------------------------------- snapshots

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FLOAT_EXACT_MS = 7258118400000  # 2200-01-01: below it ms / 1000 rounds back exactly
_MAX_MS = 253402300800000  # 10000-01-01: datetime's limit


def _ms_time(stamp: int) -> datetime | None:
    """Milliseconds since the epoch -> aware datetime, exactly; None when out of range."""
    if 0 < stamp < _FLOAT_EXACT_MS:
        return datetime.fromtimestamp(stamp / 1000, UTC)  # 3x faster than timedelta
    if _FLOAT_EXACT_MS <= stamp < _MAX_MS:
        return _EPOCH + timedelta(milliseconds=stamp)
    return None


#: What a Greeks row is made of, by field name: the symbol, the index (checked only),
#: then the columns `SnapshotMapper._greeks_columns` zips, in its order.
_GREEKS_COLUMNS = (
    "eventSymbol",
    "index",
    "eventFlags",
    "time",
    "eventTime",
    "price",
    "volatility",
    "delta",
    "gamma",
    "theta",
    "rho",
    "vega",
)
_GREEKS_PLANS: dict[tuple[str, ...], tuple[int | None, ...]] = {}
_STR = frozenset({str})
_INT_OR_NONE = frozenset({int, type(None)})
_FLOAT_OR_NONE = frozenset({float, type(None)})
_NUMBER_OR_NONE = frozenset({float, int, type(None)})


def _greeks_plan(names: Sequence[str]) -> tuple[int | None, ...]:
    """Where each of `_GREEKS_COLUMNS` sits in a Greeks layout (None: not in it), made
    once per layout a channel announces."""
    if len(_GREEKS_PLANS) >= 64:  # layouts come from servers: keep the memo bounded
        _GREEKS_PLANS.clear()
    plan = tuple(names.index(c) if c in names else None for c in _GREEKS_COLUMNS)
    _GREEKS_PLANS[tuple(names)] = plan
    return plan


def greeks_columns(values: list[Any], names: Sequence[str]) -> list[Iterable[Any]] | None:
    """A COMPACT Greeks group decoded column by column, without a dict per event: each
    field is a strided slice of the flat value list (`values[position::width]`, its
    position in the channel's layout), type-checked a column at a time. The columns are
    eventSymbol, eventFlags, time, eventTime, price, volatility, delta, gamma, theta,
    rho, vega (`_GREEKS_COLUMNS`); an int stamp or flag is kept, anything else reads as
    absent; numbers are floats or None ('NaN' & co.). None when the group needs the
    per-event path, which reports each odd value in its place: a symbol that is not a
    string, an index that is not an int, a value of the wrong type."""
    plan = _GREEKS_PLANS.get(names) if isinstance(names, tuple) else None
    if plan is None:
        plan = _greeks_plan(names)
    width = len(names)
    count = len(values) // width
    symbol_at, index_at, *value_at = plan
    if symbol_at is None:
        return None
    symbols = values[symbol_at::width]
    # 'NaN' is no symbol (`_clean_full` makes it None: reported by the event path)
    if not _STR.issuperset(map(type, symbols)) or not NON_FINITE.isdisjoint(symbols):
        return None
    if index_at is not None and not _INT_OR_NONE.issuperset(map(type, values[index_at::width])):
        return None
    # eventFlags, time, eventTime: anything but an int reads as absent, as a 'NaN'
    # made None does; then price .. vega, numbers with 'NaN' & co. as None.
    columns: list[Iterable[Any]] = [symbols]
    for position in value_at:
        columns.append(repeat(None, count) if position is None else values[position::width])
    # The common case first: every number column present and all floats (or None),
    # checked in one pass over them all (~0.08 µs an event less than column by column)
    if None not in value_at[3:] and _FLOAT_OR_NONE.issuperset(
        map(type, chain.from_iterable(columns[4:]))
    ):
        return columns
    for number in range(4, len(columns)):
        column = columns[number]
        if column.__class__ is not list or _FLOAT_OR_NONE.issuperset(map(type, column)):
            continue
        column = [None if v.__class__ is str and v in NON_FINITE else v for v in column]
        if not _NUMBER_OR_NONE.issuperset(map(type, column)) or not all(
            -(2**64) < v < 2**64 for v in column if v.__class__ is int
        ):
            return None  # reported (where held) by the per-event path
        columns[number] = [float(v) if v.__class__ is int else v for v in column]
    return columns


class SnapshotMapper:
    """Turns decoded events into Snapshot rows for the positions we hold.

    Quote/Trade events of underlyings only update per-symbol prices (Quote mid first,
    else last trade), which later Greeks rows carry as `underlying_price`: an equity
    option's underlying symbol's, a futures option's future's (`FeedSymbols.future`).
    One streamer symbol held in two accounts yields one row per account. A Greeks event
    flagged REMOVE_EVENT yields no row (see `REMOVE_EVENT`); one for a symbol not held
    (a position closed while its events were in flight, or a server mistake) is counted.
    """

    __slots__ = (
        "_broker",
        "_by_symbol",
        "_last",
        "_mid",
        "_price_symbol",
        "removed_events",
        "unknown_events",
    )

    def __init__(self, broker: Broker = Broker.TASTYTRADE) -> None:
        self._broker = broker
        self._by_symbol: dict[str, list[Contract]] = {}
        self._price_symbol: dict[str, str] = {}  # option streamer symbol -> its underlying's
        self._mid: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self.removed_events = 0  # Greeks flagged REMOVE_EVENT: counted, never stored
        self.unknown_events = 0  # Greeks for a symbol no held contract maps to

    def set_contracts(
        self, contracts: Iterable[Contract], feeds: Mapping[ContractKey, FeedSymbols] | None = None
    ) -> dict[str, list[Contract]]:
        """Replace the held contracts; returns them by streamer symbol. A futures
        option's symbols come from `feeds` (the instruments API's, cached by the session):
        one without them cannot be streamed and is left out (the caller counts it)."""
        by_symbol: dict[str, list[Contract]] = {}
        price_symbol: dict[str, str] = {}
        for contract in contracts:
            key = contract.key
            if key.future:
                feed = feeds.get(key) if feeds else None
                if feed is None:
                    continue
                symbol, price_symbol[feed.option] = feed.option, feed.future
            else:
                symbol = streamer_symbol(key)
                price_symbol[symbol] = contract.underlying
            by_symbol.setdefault(symbol, []).append(contract)
        self._by_symbol = by_symbol
        self._price_symbol = price_symbol
        return by_symbol

    def price_symbols(self) -> set[str]:
        """The symbols whose Quote and Trade give the held contracts' underlying prices."""
        return set(self._price_symbol.values())

    def underlying_price(self, symbol: str) -> float | None:
        mid = self._mid.get(symbol)
        return mid if mid is not None else self._last.get(symbol)

    def map(
        self, events: Iterable[FeedEvent], received_at: datetime
    ) -> tuple[list[Snapshot], list[str]]:
        rows: list[Snapshot] = []
        problems: list[str] = []
        for event in events:
            kind = event["eventType"]
            if kind == "Greeks":
                contracts = self._by_symbol.get(event["eventSymbol"])
                if contracts:
                    self._greeks(event, contracts, received_at, rows, problems)
                else:
                    self.unknown_events += 1
            elif kind == "Quote":
                self._quote(event, problems)
            elif kind == "Trade":
                price = _number(event, "price", problems)
                if price is not None and price > 0:
                    self._last[event["eventSymbol"]] = price
        return rows, problems

    def feed_rows(
        self, data: list[Any], layouts: Mapping[str, Sequence[str]], received_at: datetime
    ) -> tuple[list[Snapshot], list[str]]:
        """FEED_DATA `data` straight to rows, and every problem (`decode_feed_data`'s,
        then `map`'s): the same rows and problems as `map(decode_feed_data(...))`, which
        builds a dict per event.

        Here a COMPACT Greeks group is read column by column: each field the rows need
        is a strided slice of the group's flat value list (`values[position::width]`,
        its position in the channel's layout), type-checked a column at a time, then
        zipped into rows. A group that needs anything more (a value of the wrong type,
        to be reported in its place; a raw event kept as `source_payload`), FULL data
        and the other event types take the per-event dicts."""
        if not data or data[0].__class__ is dict or KEEP_PAYLOAD.get():
            decoded, problems = decode_feed_data(data, layouts)
            rows, mapping = self.map(decoded, received_at)
            return rows, problems + mapping
        rows = []
        problems = []
        mapping = []
        for event_type, values, names in compact_groups(data, layouts, problems):
            if event_type == "Greeks" and self._greeks_columns(values, names, received_at, rows):
                continue
            events: list[FeedEvent] = []
            _decode_group(event_type, values, names, events, problems)
            more_rows, more_problems = self.map(events, received_at)
            rows += more_rows
            mapping += more_problems
        return rows, problems + mapping

    def _greeks_columns(
        self, values: list[Any], names: Sequence[str], received_at: datetime, rows: list[Snapshot]
    ) -> bool:
        """A COMPACT Greeks group's rows appended to `rows`; False (nothing done) when
        the group needs the per-event path (see `feed_rows`)."""
        columns = greeks_columns(values, names)
        if columns is None:
            return False
        by_symbol, mid, last, broker = self._by_symbol, self._mid, self._last, self._broker
        price_symbols = self._price_symbol
        append = rows.append
        for symbol, flags, stamp, event_stamp, price, vol, delta, gamma, theta, rho, vega in zip(
            *columns, strict=True
        ):
            contracts = by_symbol.get(symbol)
            if not contracts:
                self.unknown_events += 1
                continue
            if flags.__class__ is int and flags & REMOVE_EVENT:
                self.removed_events += 1  # a removal of the event at `index`, not a tick
                continue
            if stamp.__class__ is not int or stamp <= 0:
                stamp = event_stamp
            event_time = (_ms_time(stamp) if stamp.__class__ is int else None) or received_at
            price_symbol = price_symbols[symbol]
            underlying_price = mid.get(price_symbol)
            if underlying_price is None:
                underlying_price = last.get(price_symbol)
            for contract in contracts:
                append(
                    Snapshot(  # as in _greeks
                        broker,
                        *contract.row_identity,
                        delta,
                        gamma,
                        theta,
                        vega,
                        rho,
                        vol,
                        underlying_price,
                        None,
                        None,
                        None,
                        price,
                        event_time,
                        received_at,
                        None,
                    )
                )
        return True

    def _quote(self, event: FeedEvent, problems: list[str]) -> None:
        bid = _number(event, "bidPrice", problems)
        ask = _number(event, "askPrice", problems)
        sides = [side for side in (bid, ask) if side is not None and side > 0]
        if len(sides) == 2:
            self._mid[event["eventSymbol"]] = (sides[0] + sides[1]) / 2
        elif sides:
            self._mid[event["eventSymbol"]] = sides[0]
        else:
            self._mid.pop(event["eventSymbol"], None)

    def _greeks(
        self,
        event: FeedEvent,
        contracts: list[Contract],
        received_at: datetime,
        rows: list[Snapshot],
        problems: list[str],
    ) -> None:
        get = event.get
        flags = get("eventFlags")
        if flags.__class__ is int and flags & REMOVE_EVENT:  # type: ignore[operator]
            self.removed_events += 1  # a removal of the event at `index`, not a tick
            return
        # Floats out of `decode_feed_data` are always finite (orjson refuses non-finite
        # numbers, the fallback parser maps them to None), so a float needs no check.
        price, vol, delta = get("price"), get("volatility"), get("delta")
        gamma, theta, rho, vega = get("gamma"), get("theta"), get("rho"), get("vega")
        if price.__class__ is not float:
            price = _number(event, "price", problems)
        if vol.__class__ is not float:
            vol = _number(event, "volatility", problems)
        if delta.__class__ is not float:
            delta = _number(event, "delta", problems)
        if gamma.__class__ is not float:
            gamma = _number(event, "gamma", problems)
        if theta.__class__ is not float:
            theta = _number(event, "theta", problems)
        if rho.__class__ is not float:
            rho = _number(event, "rho", problems)
        if vega.__class__ is not float:
            vega = _number(event, "vega", problems)
        stamp = get("time")
        if stamp.__class__ is not int or stamp <= 0:
            stamp = get("eventTime")
        event_time = (_ms_time(stamp) if stamp.__class__ is int else None) or received_at
        payload = event if KEEP_PAYLOAD.get() else None
        price_symbol = self._price_symbol[event["eventSymbol"]]
        mid = self._mid.get(price_symbol)
        underlying_price = mid if mid is not None else self._last.get(price_symbol)
        for contract in contracts:
            rows.append(
                Snapshot(  # positional, in field order: ~1 µs less than for_contract
                    self._broker,
                    *contract.row_identity,
                    delta,
                    gamma,
                    theta,
                    vega,
                    rho,
                    vol,  # implied_volatility
                    underlying_price,
                    None,  # bid, ask, last: the option's are not in Greeks events
                    None,
                    None,
                    price,  # mark: the model price
                    event_time,
                    received_at,
                    payload,
                )
            )


def _number(event: FeedEvent, name: str, problems: list[str]) -> float | None:
    """A finite float or None; a value of the wrong type is reported, never stored."""
    value: Any = event.get(name)
    kind = value.__class__
    if kind is float:
        return value if value - value == 0.0 else None  # type: ignore[no-any-return]
    if kind is int and -(2**64) < value < 2**64:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    if value is not None:
        problems.append(f"{event['eventSymbol']}: {name} {value!r:.40} is not a number")
    return None


# --------------------------------------------------------------------------- REST records


@dataclass(frozen=True, slots=True)
class Positions:
    """Open option positions, plus what was held but cannot be recorded.

    `feeds`: the DXLink symbols of the futures options among `contracts`.
    `unsupported`: positions held but not streamed, by reason (a futures option whose
    instrument or future could not be looked up, or whose symbols disagree)."""

    contracts: list[Contract]
    skipped_unparsable: int = 0
    feeds: Mapping[ContractKey, FeedSymbols] = field(default_factory=dict)
    unsupported: Mapping[str, int] = field(default_factory=dict)

    def streamer_symbol(self, key: ContractKey) -> str:
        feed = self.feeds.get(key)
        return feed.option if feed is not None else streamer_symbol(key)

    @classmethod
    def from_record(cls, contracts: list[Contract], body: Mapping[str, Any]) -> Positions:
        """What a recording's positions record held: its contracts and `feeds` (written
        by `feeds_json`), so replay maps futures options' events as the live link did."""
        feeds = {
            ContractKey.parse(key): FeedSymbols(option, future)
            for key, (option, future) in body.get("feeds", {}).items()
        }
        return cls(contracts, feeds=feeds)


def feeds_json(feeds: Mapping[ContractKey, FeedSymbols]) -> dict[str, list[str]]:
    """Feed symbols for a recording's positions record (`Positions.from_record`)."""
    return {str(key): [feed.option, feed.future] for key, feed in feeds.items()}


_BUY_ACTIONS = frozenset({"Buy to Open", "Buy to Close", "Buy"})
_EQUITY_OPTION = "Equity Option"
_FUTURE_OPTION_TYPE = "Future Option"


def transaction_trade(tx: Mapping[str, Any]) -> Trade:
    """A "Trade" transaction (its JSON, dasherized keys as the API sends them) to a
    `Trade`: the transaction id is the broker trade id, side from the action ("Buy to
    Open" -> buy), quantity positive, the key from the OCC symbol of an equity option or
    the symbol of a futures option (None for anything else). Raises ValueError naming
    the gap."""
    action = tx.get("action")
    if action is None:
        raise ValueError("no action")
    quantity = _decimal(tx.get("quantity"))
    if quantity is None or quantity == 0 or not quantity.is_finite():
        raise ValueError(f"bad quantity {tx.get('quantity')}")
    symbol = tx.get("symbol")
    key = None
    if tx.get("instrument-type") == _EQUITY_OPTION and symbol:
        key = str(parse_occ(symbol))
    elif tx.get("instrument-type") == _FUTURE_OPTION_TYPE and symbol:
        key = str(parse_future_option_symbol(symbol))
    return Trade(
        broker=Broker.TASTYTRADE,
        broker_trade_id=str(tx["id"]),
        account_id=tx["account-number"],
        contract_key=key,
        symbol=symbol or tx.get("underlying-symbol") or "",
        side="buy" if action in _BUY_ACTIONS else "sell",
        quantity=abs(quantity),
        price=_decimal(tx.get("price")),
        executed_at=datetime.fromisoformat(tx["executed-at"]),
        source_payload=dict(tx),
    )


def transaction_trades(transactions: Iterable[Mapping[str, Any]]) -> tuple[list[Trade], list[str]]:
    """The fills among `transactions` as `Trade`s, and a reason for each trade
    transaction that could not be mapped (other transaction types are not fills)."""
    trades: list[Trade] = []
    rejected: list[str] = []
    for tx in transactions:
        if tx.get("transaction-type") != "Trade":
            continue
        try:
            trades.append(transaction_trade(tx))
        except (ValueError, KeyError, TypeError) as exc:
            rejected.append(f"transaction {tx.get('id')}: {exc}")
    return trades, rejected


def _decimal(value: Any) -> Decimal | None:
    """A JSON number or numeric string as a Decimal (None stays None)."""
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r:.40}") from None
