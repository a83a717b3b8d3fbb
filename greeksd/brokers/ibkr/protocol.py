"""Sans-I/O core of the IBKR Client Portal websocket and REST shapes.

Text frames in, events out; commands out as plain `TOPIC+{ARGS}` text (not JSON objects:
a JSON-object subscription is the classic "connected but no Greeks" bug). Market data is
sent as partial updates, so `MarketDataBook` keeps per-conid state, merges, and maps an
option's merged fields to a `Snapshot`. Shared by the stream and the probe; the simulator
speaks the server side with its own code (greeksd.sim.ibkr_wire).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
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
    future_root,
)

LAST, BID, ASK, MARK = "31", "84", "86", "7635"
DELTA, GAMMA, THETA, VEGA, IV = "7308", "7309", "7310", "7311", "7633"
AVAILABILITY = "6509"
OPTION_FIELDS: tuple[str, ...] = (LAST, BID, ASK, DELTA, GAMMA, THETA, VEGA, IV)
UNDERLYING_FIELDS: tuple[str, ...] = (LAST,)
SNAPSHOT_TRIGGERS = frozenset({LAST, BID, ASK, MARK, DELTA, GAMMA, THETA, VEGA, IV})
CLEARED = frozenset({"", "N/A"})
TIC = "tic"
ECHO_HB = "ech+hb"
TRADES_SUBSCRIBE = "str+{}"
_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9}


# ---- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoggedIn:
    """`system` success: the gateway accepted this socket."""

    username: str
    is_paper: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    epoch_ms: int


@dataclass(frozen=True, slots=True)
class TicReply:
    alive: bool
    last_accessed: int | None


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """One `sts` frame. Real gateways split a status into several frames, each with only
    some fields: a field the frame does not carry is None (unknown), never False."""

    authenticated: bool | None
    competing: bool | None
    message: str
    fail: str


@dataclass(frozen=True, slots=True)
class Accounts:
    accounts: tuple[str, ...]
    selected: str | None


@dataclass(frozen=True, slots=True)
class Notice:
    """Bulletins (`blt`), notifications (`ntf`), other `system` frames: logged, not acted
    on here."""

    topic: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Trades:
    """`str` topic: executions, raw, because an execution names its option only by conid;
    `execution_trade` maps one once the stream knows the conid's contract."""

    executions: tuple[dict[str, Any], ...]


@dataclass(slots=True)
class MarketData:
    """Not frozen, unlike the other events: one is made per tick, where a frozen
    dataclass's `__init__` (a `object.__setattr__` call per field) costs ~0.3 µs more;
    nothing assigns to one (and its dict of fields never made it hashable)."""

    conid: int
    fields: dict[str, str]
    updated_ms: int | None


@dataclass(frozen=True, slots=True)
class GatewayErrorMessage:
    message: str
    code: Any


@dataclass(frozen=True, slots=True)
class WaitingForSession:
    """Legacy handshake prompt: the socket has no session yet."""


@dataclass(frozen=True, slots=True)
class Echo:
    """The raw `ech+hb` text the gateway echoes back."""


@dataclass(frozen=True, slots=True)
class Unknown:
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str
    raw: str


Event = (
    LoggedIn
    | Heartbeat
    | TicReply
    | AuthStatus
    | Accounts
    | Notice
    | Trades
    | MarketData
    | GatewayErrorMessage
    | WaitingForSession
    | Echo
    | Unknown
    | Malformed
)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _tri_state(args: Mapping[str, Any], key: str) -> bool | None:
    """An `sts` flag: absent or null => None (unknown); anything but a JSON bool is
    malformed rather than guessed."""
    value = args.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"sts {key} must be a boolean, got {value!r:.40}")


_STR_ONLY = frozenset({str})
_SMD_META = ("topic", "conid", "conidEx", "server_id", "_updated")
"""The keys of a market-data frame that are not field ids."""
_KNOWN_IDS = frozenset({*SNAPSHOT_TRIGGERS, AVAILABILITY, "6119"})
"""Field ids a gateway sends us as a rule (all digits): the fields we subscribe, and the
availability and server marker it adds."""


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


_BYTES = (bytes, bytearray)  # a tuple: `bytes | bytearray` would be built at each call


def parse_frame(data: str | bytes) -> Event:
    """Decode one websocket frame. Never raises: bad input becomes `Malformed`."""
    raw = data.decode("utf-8", "replace") if isinstance(data, _BYTES) else data
    if raw[:1] != "{" and raw.strip() == ECHO_HB:  # a JSON object never is the echo
        return Echo()
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Malformed(f"invalid JSON: {exc}", raw[:200])
    if not isinstance(obj, dict):
        return Malformed(f"expected a JSON object, got {type(obj).__name__}", raw[:200])
    try:
        return _classify(obj)
    except (TypeError, ValueError, AttributeError) as exc:
        return Malformed(f"bad {obj.get('topic', 'frame')!s:.40}: {exc}", raw[:200])


def _classify(obj: dict[str, Any]) -> Event:
    topic = obj.get("topic")
    if topic is None or not isinstance(topic, str):
        if "error" in obj:
            return GatewayErrorMessage(str(obj["error"]), obj.get("code"))
        if obj.get("message") == "waiting for session":
            return WaitingForSession()
        return Unknown(obj)
    if topic.startswith("smd+"):
        conid, updated = obj.get("conid"), obj.get("_updated")
        if conid.__class__ is not int or not conid:  # (a plain int: no call, as a rule)
            conid = _int_or_none(conid) or _int_or_none(topic[4:].split("@")[0])
            if conid is None:
                raise ValueError(f"no conid in {topic!r}")
        if updated.__class__ is not int:
            updated = _int_or_none(updated)
        try:  # every one of them, as a rule: one statement instead of a pop() each
            del obj["topic"], obj["conid"], obj["conidEx"], obj["server_id"], obj["_updated"]
        except KeyError:
            for key in _SMD_META:
                obj.pop(key, None)
        # What is left are field ids ('31', '7308'), as a rule the ones we know (one C
        # call); else, when the keys run together are all digits and none is empty, each
        # starts with a digit (two C calls instead of a comprehension over every key)
        if not _KNOWN_IDS.issuperset(obj) and (not "".join(obj).isdigit() or "" in obj):
            obj = {k: v for k, v in obj.items() if k[:1].isdigit()}
        if not _STR_ONLY.issuperset(map(type, obj.values())):
            obj = {k: _as_text(v) for k, v in obj.items()}
        return MarketData(conid, obj, updated)
    args = obj.get("args")
    if topic == "system":
        if "hb" in obj:
            hb = _int_or_none(obj["hb"])
            if hb is None:
                raise ValueError(f"bad heartbeat {obj['hb']!r}")
            return Heartbeat(hb)
        if "success" in obj:
            return LoggedIn(str(obj["success"]), bool(obj.get("isPaper", False)))
        return Notice(topic, obj)
    if topic == "sts" and isinstance(args, dict):
        return AuthStatus(
            _tri_state(args, "authenticated"),
            _tri_state(args, "competing"),
            str(args.get("message") or ""),
            str(args.get("fail") or ""),
        )
    if topic == "act" and isinstance(args, dict):
        accounts = tuple(str(a) for a in args.get("accounts") or ())
        selected = args.get("selectedAccount")
        return Accounts(accounts, str(selected) if selected else None)
    if topic == "tic":
        return TicReply(bool(obj.get("alive")), _int_or_none(obj.get("lastAccessed")))
    if topic == "str":
        if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
            raise ValueError("str args must be a list of execution objects")
        return Trades(tuple(args))
    if topic in {"blt", "ntf"}:
        return Notice(topic, obj)
    if topic == "error" or "error" in obj:
        return GatewayErrorMessage(str(obj.get("error", args)), obj.get("code"))
    return Unknown(obj)


# ---- values ------------------------------------------------------------------------------
def parse_value(raw: Any) -> float | None:
    """'193.18', 'C193.10' (prior close), 'H…' (halted), '28.4%', '1.2M', '15.3K', '1,234'.
    Empty, 'N/A' or unparseable => None (never 0, never NaN)."""
    if raw.__class__ is str:
        try:  # the common case, a plain number: one call instead of the slow path below
            value = float(raw)
        except ValueError:
            pass
        else:
            return value if value - value == 0.0 else None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw) if math.isfinite(raw) else None
    if not isinstance(raw, str):
        return None
    text = raw.strip().replace(",", "")
    if text in CLEARED or text.upper() == "N/A":
        return None
    if text[0] in "CH":
        text = text[1:]
    scale = 1.0
    if text.endswith("%"):
        text = text[:-1]
    elif text[-1:] in _SCALE:
        scale, text = _SCALE[text[-1]], text[:-1]
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_fraction(raw: Any) -> float | None:
    """Field 7633 is a percent ('28.4%'); greeksd stores IV as a fraction like Tastytrade."""
    value: float | None
    if raw.__class__ is str and raw[-1:] == "%":  # the common case, without an exception
        if len(raw) <= 16:
            # A numeral of at most 15 digits is the decimal its float's repr gives back
            # (doubles hold 15 digits), so "<numeral>e-2" is that decimal / 100, rounded
            # once by float: the result of the exact path below, in one call. Anything
            # else ('C28.4%', '1e5%', 'nan%') is no such numeral and fails here.
            try:
                value = float(raw[:-1] + "e-2")
            except ValueError:
                pass
            else:
                return value if value - value == 0.0 else None
        try:
            number = float(raw[:-1])
        except ValueError:
            value = parse_value(raw)
        else:
            value = number if number - number == 0.0 else None
    else:
        value = parse_value(raw)
    if value is None:
        return None
    text = repr(value)
    if "e" in text:
        return float(Decimal(text) / 100)
    # The same correctly rounded decimal result as the Decimal division, 5x cheaper.
    return float(text + "e-2")


def epoch_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)  # positional: ~150 ns less than tz=


LIVE, DELAYED, FROZEN = "live", "delayed", "frozen"
_QUALITY = {"R": LIVE, "D": DELAYED, "Z": FROZEN, "Y": FROZEN}


def market_data_quality(availability: str | None) -> str | None:
    """Field 6509's first letter: R realtime => 'live', D delayed => 'delayed', Z frozen
    and Y frozen-delayed => 'frozen'; N (not subscribed), empty or absent => None
    (unknown). A delayed or frozen row's `_updated` is the push time, not a quote time,
    so rows carry this flag and are never taken for live data."""
    return _QUALITY.get(availability[:1]) if availability else None


# ---- commands ----------------------------------------------------------------------------
def frame(obj: Mapping[str, Any]) -> str:
    """A JSON object as one text frame (command arguments, the session handshake)."""
    return orjson.dumps(dict(obj)).decode()


def smd_command(conid: int, fields: Iterable[str] = OPTION_FIELDS, exchange: str = "") -> str:
    """`smd+265598+{"fields":["31",...]}`; `exchange` routes to one venue (`265598@CBOE`)."""
    target = f"{conid}@{exchange}" if exchange else str(conid)
    return f"smd+{target}+{frame({'fields': [str(f) for f in fields]})}"


def umd_command(conid: int) -> str:
    return f"umd+{conid}+{{}}"


def session_cookie(session: str) -> str:
    """The upgrade request's cookie value: `api={"session": "<tickle session>"}`."""
    return 'api={"session": ' + orjson.dumps(session).decode() + "}"


# ---- positions (REST) --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OptionPosition:
    conid: int
    und_conid: int | None
    contract: Contract


_OCC_LOCAL = re.compile(r"\[(.{6}\d{6}[CP]\d{8})[ \]]")


def occ_local_symbol(position: Mapping[str, Any]) -> str | None:
    """The OCC symbol IBKR shows as the local symbol inside `contractDesc`
    ('SPXW   DEC2026 5800 P [SPXW  261218P05800000 100]'), if any."""
    match = _OCC_LOCAL.search(str(position.get("contractDesc") or ""))
    return match[1] if match else None


def option_key(position: Mapping[str, Any]) -> ContractKey:
    """A position's or secdef's `ContractKey`, the same one Tastytrade's symbols give.

    The OCC local symbol wins when present: it is exactly what Tastytrade reports
    (IBKR's `expiry` is the last trading day, which for AM-settled index options is the
    day before the OCC expiration). Without it: `tradingClass` (secdef) is the root
    (SPXW, not SPX, for weeklies), else `ticker`/`undSym`; expiry `YYYYMMDD`, `putOrCall`,
    `strike` as a string. Raises ValueError naming what is wrong."""
    local = occ_local_symbol(position)
    if local is not None:
        return ContractKey.from_occ(local)
    root = next(
        (
            str(position[k])
            for k in ("tradingClass", "ticker", "undSym")
            if isinstance(position.get(k), str) and position[k]
        ),
        None,
    )
    if not root:
        raise ValueError("no OCC local symbol, trading class, ticker or undSym")
    try:
        expiry = datetime.strptime(str(position["expiry"]), "%Y%m%d").date()
        right = OptionRight(str(position["putOrCall"]).upper()[:1])
        strike = Decimal(str(position["strike"]))
    except KeyError as exc:
        raise ValueError(f"missing {exc}") from None
    except InvalidOperation:
        raise ValueError(f"bad strike {position['strike']!r}") from None
    return ContractKey(root, expiry, right, strike)


def missing_option_fields(position: Mapping[str, Any]) -> list[str]:
    """What a position lacks to become a `Contract`; fill those from secdef."""
    missing = ["multiplier"] if position.get("multiplier") in (None, "") else []
    if occ_local_symbol(position) is None:
        needed = ("expiry", "putOrCall", "strike")
        missing += [k for k in needed if position.get(k) in (None, "")]
        if not isinstance(position.get("tradingClass"), str):
            missing.append("tradingClass")
    return missing


def parse_option_position(position: Mapping[str, Any], account_id: str) -> OptionPosition:
    """One `/portfolio/{acct}/positions` entry (optionally overlaid with its secdef) to an
    `OptionPosition`. Raises ValueError naming what is wrong."""
    try:
        key = option_key(position)
        quantity = Decimal(str(position["position"]))
        multiplier = Decimal(str(position["multiplier"]))
    except (KeyError, ValueError, InvalidOperation) as exc:
        raise ValueError(f"bad option position {position.get('conid')}: {exc}") from None
    underlying = str(position.get("undSym") or position.get("ticker") or key.root)
    acct = str(position.get("acctId") or account_id)
    return OptionPosition(
        int(position["conid"]),
        und_conid(position),
        Contract(key, underlying, multiplier, quantity, acct),
    )


def is_option(position: Mapping[str, Any]) -> bool:
    return position.get("assetClass") == "OPT" and _int_or_none(position.get("conid")) is not None


# ---- futures options (FOP) ---------------------------------------------------------------
# Real gateways list a futures option with little more than its description: a captured
# `/portfolio/{acct}/positions` entry (public test data of a C# Client Portal client, found
# with the code search: tests/fixtures/real/ibkr/fop-positions.json keeps it with its
# provenance) is
#   {"conid":"784136636","contractDesc":"ES     JUN2025 6040 C (E2D)","expiry":null,
#    "putOrCall":null,"multiplier":null,"strike":0.0,"assetClass":"FOP","undConid":0,...}
# The trading class (CME's option product) is the parenthesised code; the expiration,
# strike, right, multiplier and the future's conid (`undConid`) come from /trsrv/secdef,
# and the future's code from /iserver/contract/{undConid}/info (`local_symbol` 'ESZ5',
# `contract_month` '202512').
_FOP_CLASS = re.compile(r"\(([A-Z0-9]{1,6})\)\s*$")


class UnsupportedPosition(ValueError):
    """A held option greeksd cannot record (e.g. a futures option whose future the gateway
    does not name): counted and logged with this reason, never a crash."""


def is_future_option(position: Mapping[str, Any]) -> bool:
    return position.get("assetClass") == "FOP" and _int_or_none(position.get("conid")) is not None


def fop_trading_class(position: Mapping[str, Any]) -> str | None:
    """The option product: `tradingClass` (secdef/info), `trading_class` (contract info),
    else the '(EW3)' that ends a position's `contractDesc`."""
    for field_name in ("tradingClass", "trading_class"):
        value = position.get(field_name)
        if isinstance(value, str) and value:
            return value
    match = _FOP_CLASS.search(str(position.get("contractDesc") or ""))
    return match[1] if match else None


def _given(value: Any) -> bool:
    """A field a real gateway actually filled: FOP positions send null, '' and 0 for
    what they do not know (`strike: 0.0`, `undConid: 0`)."""
    return value not in (None, "") and value != 0 and value != "0"


def overlay(secdef: Mapping[str, Any], position: Mapping[str, Any]) -> dict[str, Any]:
    """A position's fields over its secdef's, where the position actually gives them (a
    zero strike, multiplier or undConid is the gateway's "unknown", a zero position is
    not)."""
    return {
        **secdef,
        **{
            k: v
            for k, v in position.items()
            if v not in (None, "") and (k not in _ZERO_IS_UNKNOWN or _given(v))
        },
    }


_ZERO_IS_UNKNOWN = frozenset({"strike", "multiplier", "undConid"})


def missing_future_option_fields(position: Mapping[str, Any]) -> list[str]:
    """What a FOP position lacks to become a `Contract` (the future's code aside); fill
    those from secdef."""
    needed = ("undConid", "putOrCall", "strike", "multiplier")
    missing = [k for k in needed if not _given(position.get(k))]
    if not any(_given(position.get(k)) for k in _FOP_EXPIRY):
        missing.append("expiry")
    return missing


_FOP_EXPIRY = ("maturityDate", "expiry", "maturity_date", "lastTradingDay")


def und_conid(position: Mapping[str, Any]) -> int | None:
    """The underlying's conid, None when the gateway sends none (or its 0)."""
    return _int_or_none(position.get("undConid")) or None


def future_code(info: Mapping[str, Any], not_before: date) -> str:
    """A future's canonical code ('ESZ25') from its contract info or secdef: the local
    symbol ('ESZ5'), else the symbol and contract month ('ES', '202512'). Raises
    ValueError."""
    local = info.get("local_symbol") or info.get("localSymbol")
    if isinstance(local, str) and local:
        try:
            return canonical_future(local.replace(" ", ""), not_before)
        except ValueError:
            pass  # e.g. an old-style 'ZN   DEC 25': the contract month says it too
    symbol = info.get("symbol") or info.get("ticker")
    month = str(info.get("contract_month") or info.get("contractMonth") or "")
    if isinstance(symbol, str) and symbol and len(month) == 6 and month.isdigit():
        return f"{symbol}{FUTURE_MONTHS[int(month[4:]) - 1]}{month[2:4]}"
    raise ValueError(f"no future code in local symbol {local!r} or contract month {month!r}")


def future_option_key(position: Mapping[str, Any], future: str) -> ContractKey:
    """A FOP position's (overlaid with its secdef) `ContractKey` on the future `future`
    (any spelling `canonical_future` reads). The expiration is the option's own date
    (`maturityDate`, else `expiry`): the same date Tastytrade gives as `expiration-date`.
    Raises ValueError naming what is wrong."""
    product = fop_trading_class(position)
    if not product:
        raise ValueError("no trading class")
    expiry = next((position[k] for k in _FOP_EXPIRY if _given(position.get(k))), None)
    if expiry is None:
        raise ValueError("no maturityDate or expiry")
    try:
        expiration = datetime.strptime(str(expiry), "%Y%m%d").date()
        right = OptionRight(str(position.get("putOrCall") or position.get("right")).upper()[:1])
        strike = Decimal(str(position["strike"]))
    except KeyError as exc:
        raise ValueError(f"missing {exc}") from None
    except InvalidOperation:
        raise ValueError(f"bad strike {position['strike']!r}") from None
    return ContractKey(product, expiration, right, strike, canonical_future(future, expiration))


def parse_future_option_position(
    position: Mapping[str, Any], account_id: str, futures: Mapping[int, Mapping[str, Any]]
) -> OptionPosition:
    """One FOP position (overlaid with its secdef) to an `OptionPosition` on its future,
    `futures` being the contract info of the futures by conid. The underlying is the
    futures product ('ES'), the underlying line the future's conid. Raises
    `UnsupportedPosition` when the future is unknown, ValueError for anything else."""
    conid, underlying_conid = position.get("conid"), und_conid(position)
    info = futures.get(underlying_conid) if underlying_conid else None
    if info is None:
        why = (
            f"its future (undConid {underlying_conid}) is unknown to the gateway"
            if underlying_conid
            else "the gateway names no future (no undConid in its position or secdef)"
        )
        raise UnsupportedPosition(f"futures option {conid}: {why}")
    try:
        expiry = next((position[k] for k in _FOP_EXPIRY if _given(position.get(k))), None)
        not_before = datetime.strptime(str(expiry), "%Y%m%d").date()
        future = future_code(info, not_before)
        key = future_option_key(position, future)
        quantity = Decimal(str(position["position"]))
        multiplier = Decimal(str(position["multiplier"]))
    except (KeyError, ValueError, InvalidOperation) as exc:
        raise ValueError(f"bad futures option position {conid}: {exc}") from None
    exchange = next(
        (
            str(v)
            for k in ("exchange", "listingExchange")
            if isinstance(v := position.get(k), str) and v
        ),
        str(info.get("exchange") or ""),
    )
    return OptionPosition(
        int(str(conid)),
        underlying_conid,
        Contract(
            key,
            future_root(key.future),
            multiplier,
            quantity,
            str(position.get("acctId") or account_id),
            exchange,
        ),
    )


@dataclass(frozen=True, slots=True)
class PositionScan:
    """Option positions greeksd records, the ones it could not read (`problems`), and the
    ones it cannot record (`unsupported`), each with its reason."""

    options: list[OptionPosition]
    problems: list[str]
    unsupported: list[str] = field(default_factory=list)


# ---- executions (websocket `str`, REST /iserver/account/trades) --------------------------
_SIDES = {"B": "buy", "BOT": "buy", "BUY": "buy", "S": "sell", "SLD": "sell", "SELL": "sell"}


def execution_trade(execution: Mapping[str, Any], key: ContractKey | None) -> Trade:
    """One execution (same fields on the websocket and REST) to a `Trade`: quantity
    positive, direction in `side`. `key` is the option's identity when the caller knows
    the conid. Raises ValueError naming what is wrong."""
    trade_id = execution.get("execution_id")
    if not isinstance(trade_id, str) or not trade_id:
        raise ValueError("execution without execution_id")
    side = _SIDES.get(str(execution.get("side") or "").upper())
    if side is None:
        raise ValueError(f"execution {trade_id}: unknown side {execution.get('side')!r}")
    try:
        quantity = abs(Decimal(str(execution.get("size")).replace(",", "")))
        raw_price = str(execution.get("price") or "").replace(",", "")
        price = Decimal(raw_price) if raw_price else None
    except InvalidOperation:
        raise ValueError(f"execution {trade_id}: bad size or price") from None
    if not quantity.is_finite() or quantity == 0:
        raise ValueError(f"execution {trade_id}: bad size {execution.get('size')!r}")
    if price is not None and not price.is_finite():
        raise ValueError(f"execution {trade_id}: bad price {execution.get('price')!r}")
    stamp = _int_or_none(execution.get("trade_time_r"))
    if stamp is not None:
        executed_at = epoch_ms(stamp)
    else:  # 'trade_time' is UTC, 'YYYYMMDD-HH:MM:SS'
        try:
            executed_at = datetime.strptime(
                str(execution.get("trade_time")), "%Y%m%d-%H:%M:%S"
            ).replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(f"execution {trade_id}: no trade_time_r or trade_time") from None
    account = execution.get("account") or execution.get("accountCode")
    if not account:
        raise ValueError(f"execution {trade_id}: no account")
    return Trade(
        broker=Broker.IBKR,
        broker_trade_id=trade_id,
        account_id=str(account),
        contract_key=str(key) if key is not None else None,
        symbol=str(execution.get("symbol") or execution.get("conid") or ""),
        side=side,
        quantity=quantity,
        price=price,
        executed_at=executed_at,
        source_payload=dict(execution),
    )


def execution_conid(execution: Mapping[str, Any]) -> int | None:
    return _int_or_none(execution.get("conid"))


def is_option_execution(execution: Mapping[str, Any]) -> bool:
    return execution.get("sec_type") == "OPT"


# ---- market data state -------------------------------------------------------------------
class MarketDataBook:
    """Per-conid merged fields: a later message without a field keeps the earlier value,
    an explicit '' or 'N/A' clears it. Snapshots only for options whose Greeks or prices
    changed; the underlying's last price (its own conid) is joined by `undConid`."""

    def __init__(self) -> None:
        self._fields: dict[int, dict[str, str]] = {}
        # Each conid's merged trigger fields (`_TRIGGERS`, None where absent) after its
        # last update: an update changed the Greeks or prices when they differ now.
        self._triggers: dict[int, list[str | None]] = {}
        self._options: dict[int, OptionPosition] = {}

    def track(self, position: OptionPosition) -> None:
        self._options[position.conid] = position

    def untrack(self, conid: int) -> None:
        self._options.pop(conid, None)
        self._fields.pop(conid, None)
        self._triggers.pop(conid, None)

    def fields(self, conid: int) -> dict[str, str]:
        return self._fields.get(conid, {})

    def market_data(self, conid: int) -> str | None:
        """'live', 'delayed', 'frozen' or None (unknown) for a conid's data so far."""
        return market_data_quality(self._fields.get(conid, {}).get(AVAILABILITY))

    def quality_counts(self) -> dict[str, int]:
        """How many held options currently get delayed or frozen data."""
        kinds = [self.market_data(conid) for conid in self._options]
        return {
            "delayed_contracts": kinds.count(DELAYED),
            "frozen_contracts": kinds.count(FROZEN),
        }

    def apply(self, event: MarketData, received_at: datetime) -> Snapshot | None:
        fields, conid = event.fields, event.conid
        merged = self._fields.get(conid)
        if merged is None:
            merged = self._fields[conid] = {}
        if CLEARED.isdisjoint(map(str.strip, fields.values())):  # nothing cleared: C loops
            merged.update(fields)
        else:
            for key, value in fields.items():
                if value.strip() in CLEARED:
                    merged.pop(key, None)
                else:
                    merged[key] = value
        get = merged.get
        # Changed: a trigger field differs from what the conid's last update left (one
        # C-level pass, where comparing the update with the merged fields cost ~3 µs).
        triggers = list(map(get, _TRIGGERS))
        if triggers == self._triggers.get(conid, _NO_TRIGGERS):
            return None
        self._triggers[conid] = triggers
        position = self._options.get(conid)
        if position is None:
            return None
        und = self._fields.get(position.und_conid, _NO_FIELDS) if position.und_conid else _NO_FIELDS
        iv = get(IV)
        # The floats, the underlying's last, and a percent IV ('28.4%') as '28.4e-2'
        # (parse_fraction's own first step, see there), in one array ('null': absent)
        floats = ",".join(map(get, _FLOAT_FIELDS, _NULLS))
        if iv is not None and iv[-1:] == "%" and len(iv) <= 16:
            array = f"[{floats},{und.get(LAST, 'null')},{iv[:-1]}e-2]"
            values = _plain_numbers(array, _ROW_NUMBERS)
        else:
            array = f"[{floats},{und.get(LAST, 'null')},null]"
            values = _plain_numbers(array, _ROW_NUMBERS)
            if values is not None:
                values[-1] = parse_fraction(iv)
        if values is None:  # parsed one by one, as ever
            texts = [*map(get, _FLOAT_FIELDS), und.get(LAST)]
            values = [*map(parse_value, texts), parse_fraction(iv)]
        delta, gamma, theta, vega, bid, ask, last, mark, und_last, implied_volatility = values
        updated = event.updated_ms
        return Snapshot(  # positional, in field order: ~1 µs less than for_contract
            Broker.IBKR,
            *position.contract.row_identity,
            delta,
            gamma,
            theta,
            vega,
            None,  # rho: IBKR has none
            implied_volatility,
            und_last,
            bid,
            ask,
            last,
            mark,
            _fromtimestamp(updated / 1000, UTC) if updated else received_at,  # epoch_ms
            received_at,
            dict(merged) if KEEP_PAYLOAD.get() else None,
            market_data_quality(get(AVAILABILITY)),
        )


_NO_FIELDS: dict[str, str] = {}
_FLOAT_FIELDS = (DELTA, GAMMA, THETA, VEGA, BID, ASK, LAST, MARK)
_NULLS = ("null",) * len(_FLOAT_FIELDS)
_ROW_NUMBERS = len(_FLOAT_FIELDS) + 2  # and the underlying's last, and the IV
_fromtimestamp = datetime.fromtimestamp
_FLOAT_OR_NONE = frozenset({float, type(None)})


def _plain_numbers(array: str, count: int) -> list[float | None] | None:
    """`parse_value` of each of `count` texts joined by commas in `array` ('[t1,t2]';
    'null': an absent field, None either way) when all are plain numbers, the common
    case, parsed as one JSON array: one orjson call instead of a `float()` per field
    (~0.18 µs each: CPython copies every str to ASCII first). None when any is not: the
    caller parses them one by one.

    A JSON number is a Python float literal and orjson rounds it correctly, as `float()`
    does; it refuses what overflows a double, and JSON has no NaN or infinities, so every
    float it returns is finite. Anything else gives None: a JSON integer ('-0' is int 0,
    float('-0') is -0.0), a text with a comma or bracket that parses to another count of
    values, a `true`, a string, a nested array, or text JSON refuses ('1_000', 'C193.10',
    'nan', '1e999')."""
    try:
        values = orjson.loads(array)
    except orjson.JSONDecodeError:
        return None
    if len(values) == count and _FLOAT_OR_NONE.issuperset(map(type, values)):
        return values  # type: ignore[no-any-return]
    return None


_TRIGGERS = (*_FLOAT_FIELDS, IV)
assert frozenset(_TRIGGERS) == SNAPSHOT_TRIGGERS
_NO_TRIGGERS: list[str | None] = [None] * len(_TRIGGERS)
