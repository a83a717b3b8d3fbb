"""Plain data shared by every layer: no I/O, no clocks, stdlib only.

`Snapshot` is the one normalized row both brokers produce and the writer stores; it is
a slotted dataclass because hundreds of thousands are created per minute under load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from greeksd.coverage import Coverage

_OCC_ROOT = re.compile(r"[A-Z0-9]{1,6}")
#: Futures month codes, January to December.
FUTURE_MONTHS = "FGHJKMNQUVXZ"
# A future as the brokers print it: optional '/', root, month code, 1-, 2- or 4-digit year,
# optional ':EXCHANGE' (Tastytrade '/ESZ5', IBKR 'ESZ5', dxFeed '/ESZ25:XCME').
_FUTURE = re.compile(r"/?([A-Z0-9]{1,5}?)([FGHJKMNQUVXZ])(\d|\d\d|\d{4})(?::[A-Z0-9]+)?")
_CANONICAL_FUTURE = re.compile(r"[A-Z0-9]{1,5}[FGHJKMNQUVXZ]\d\d")
_OPTION_PRODUCT = re.compile(r"[A-Z0-9]{1,6}")


class Broker(enum.StrEnum):
    """The built-in brokers' names. A row's `broker` is a plain `str`: the name of any
    registered broker (greeksd.brokers.registry), these among them."""

    IBKR = "ibkr"
    TASTYTRADE = "tastytrade"
    SYNTHETIC = "synthetic"


class OptionRight(enum.StrEnum):
    CALL = "C"
    PUT = "P"


class StreamState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"
    DISCONNECTED = "disconnected"


def format_strike(strike: Decimal) -> str:
    """Render a strike with no trailing zeros and no exponent (190, 512.5, 0.25)."""
    text = format(strike.normalize(), "f")
    return text


def canonical_strike(strike: Decimal) -> Decimal:
    """One Decimal per strike value ('5800.000', '5.8E+3' -> 5800; '512.50' -> 512.5), so
    keys built by different brokers are identical field by field, not only equal."""
    integral = strike.to_integral_value()
    return integral if strike == integral else strike.normalize()


def canonical_future(symbol: str, not_before: date) -> str:
    """The canonical code of a futures contract: root + month code + two-digit year
    ('ESZ25'), from any broker's spelling ('/ESZ5', 'ESZ5', '/ESZ25:XCME', 'ESZ2025').

    A one-digit year is the first year ending in that digit from `not_before`'s year on:
    pass the option's expiration, which never falls after its future's delivery year
    (CL's January future has options expiring in December of the year before, so the
    decade cannot be taken from the option's own year blindly). Raises ValueError."""
    match = _FUTURE.fullmatch(symbol)
    if match is None:
        raise ValueError(f"not a futures contract symbol: {symbol!r}")
    root, month, year = match.groups()
    if len(year) == 1:
        full = not_before.year + (int(year) - not_before.year) % 10
    elif len(year) == 2:
        full = 2000 + int(year)
    else:
        full = int(year)
    return f"{root}{month}{full % 100:02d}"


def future_root(future: str) -> str:
    """'ESZ25' -> 'ES': the futures product a canonical future code belongs to."""
    return future[:-3]


@dataclass(frozen=True, slots=True, order=True)
class ContractKey:
    """One option, whichever broker reports it.

    `root` is the option's trading root (SPXW, not SPX, for the weeklies): two roots on
    the same underlying are different contracts with different settlement, so the root,
    not the underlying symbol, is part of the identity.

    A futures option also names its underlying future: `future` is its canonical code
    ('ESZ25', see `canonical_future`) and `root` the option product (CME's code, which
    IBKR calls the trading class and Tastytrade the option root symbol: 'EW3', 'E2C',
    'LO', 'OZN'). Equity and index options have `future == ""`. The text form of a
    futures option key starts with '/' (no option root does):
    '/ESZ25 EW3 2025-12-19 C 6000'.
    """

    root: str
    expiration: date
    right: OptionRight
    strike: Decimal
    future: str = ""

    def __post_init__(self) -> None:
        if not self.strike.is_finite() or self.strike <= 0:
            raise ValueError(f"strike must be a positive number, got {self.strike}")
        if self.future and (
            _CANONICAL_FUTURE.fullmatch(self.future) is None
            or _OPTION_PRODUCT.fullmatch(self.root) is None
        ):
            raise ValueError(
                f"futures option needs a future like 'ESZ25' and a product like 'EW3',"
                f" got {self.future!r} and {self.root!r}"
            )
        object.__setattr__(self, "strike", canonical_strike(self.strike))

    @property
    def is_future_option(self) -> bool:
        return bool(self.future)

    def __str__(self) -> str:
        text = f"{self.root} {self.expiration.isoformat()} {self.right.value} " + format_strike(
            self.strike
        )
        return f"/{self.future} {text}" if self.future else text

    @classmethod
    def parse(cls, text: str) -> ContractKey:
        """Inverse of `str()`: 'AAPL 2025-06-20 C 190' or '/ESZ25 EW3 2025-12-19 C 6000'.
        Raises ValueError on bad input."""
        parts = text.split(" ")
        future = ""
        if len(parts) == 5 and parts[0].startswith("/"):
            future = parts.pop(0)[1:]
            if _CANONICAL_FUTURE.fullmatch(future) is None:
                raise ValueError(f"contract key has a bad future {future!r} (like ESZ25): {text!r}")
        if len(parts) != 4:
            raise ValueError(
                "contract key must be 'ROOT YYYY-MM-DD C|P STRIKE'"
                f" or '/FUTURE PRODUCT YYYY-MM-DD C|P STRIKE': {text!r}"
            )
        root, expiry, right, strike = parts
        if not root:
            raise ValueError(f"contract key has an empty root: {text!r}")
        try:
            strike_value = Decimal(strike)
        except ArithmeticError as exc:
            raise ValueError(f"contract key has a bad strike: {text!r}") from exc
        if not strike_value.is_finite() or strike_value <= 0:
            raise ValueError(f"contract key has a bad strike: {text!r}")
        return cls(root, date.fromisoformat(expiry), OptionRight(right), strike_value, future)

    @classmethod
    def from_occ(cls, symbol: str) -> ContractKey:
        """The OCC option symbol both brokers carry ('SPXW  261218P05800000': root padded
        to 6, yymmdd, C/P, strike x1000 in 8 digits; IBKR's local symbol, Tastytrade's
        `symbol`). Raises ValueError naming what is wrong."""
        root, yymmdd, right, milli = (
            symbol[:6].rstrip(" "),
            symbol[6:12],
            symbol[12:13],
            symbol[13:],
        )
        if (
            len(symbol) != 21
            or _OCC_ROOT.fullmatch(root) is None
            or not (yymmdd.isascii() and yymmdd.isdigit())
            or right not in ("C", "P")
            or not (milli.isascii() and milli.isdigit())
        ):
            raise ValueError(f"not an OCC option symbol: {symbol!r}")
        try:
            expiration = date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:]))
        except ValueError:
            raise ValueError(f"bad expiration {yymmdd!r} in {symbol!r}") from None
        strike = Decimal(int(milli)).scaleb(-3)
        if strike <= 0:
            raise ValueError(f"bad strike in {symbol!r}")
        return cls(root, expiration, OptionRight(right), strike)


@dataclass(frozen=True, slots=True)
class Contract:
    """What position discovery knows about one held option."""

    key: ContractKey
    underlying: str
    multiplier: Decimal
    quantity: Decimal
    account_id: str
    #: Where a futures option trades ('CME', 'CBOT', 'NYMEX'); '' when the broker does not
    #: say or it does not matter (equity options route SMART).
    exchange: str = ""
    #: `str(key)`, rendered once: every Snapshot row carries it (~1.2 µs saved per row).
    key_text: str = field(init=False, repr=False, compare=False)
    #: A Snapshot's fields from `account_id` to `quantity`, in order: the hot paths build
    #: rows positionally, `Snapshot(broker, *contract.row_identity, delta, ...)`.
    row_identity: tuple[str, str, str, date, Decimal, OptionRight, Decimal, Decimal] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        key = self.key
        object.__setattr__(self, "key_text", str(key))
        identity = (self.account_id, self.key_text, self.underlying, key.expiration, key.strike)
        object.__setattr__(
            self, "row_identity", (*identity, key.right, self.multiplier, self.quantity)
        )


KEEP_PAYLOAD: ContextVar[bool] = ContextVar("greeksd_keep_payload", default=True)
"""Whether the Connections' mapping code puts the raw event in `Snapshot.source_payload`
(read as each row is made, in the task that receives the frame). The service and replay set it from
GREEKSD_STORE_PAYLOAD for their task tree (trio tasks inherit the context they start
in), so with payloads off no per-row dict is built on the tick path; the writer drops
any payload that comes anyway. Elsewhere (transcripts, the probe) rows keep it."""


@contextlib.contextmanager
def keeping_payload(keep: bool) -> Iterator[None]:
    """`KEEP_PAYLOAD` is `keep` inside the block (and in tasks started from it)."""
    token = KEEP_PAYLOAD.set(keep)
    try:
        yield
    finally:
        KEEP_PAYLOAD.reset(token)


@dataclass(slots=True)
class Snapshot:
    """One normalized Greeks event. Missing values are None, never 0 or NaN."""

    broker: str
    account_id: str
    contract_key: str
    underlying: str
    expiration: date
    strike: Decimal
    option_type: OptionRight
    multiplier: Decimal | None
    quantity: Decimal | None
    delta: float | None
    gamma: float | None
    theta: float | None
    vega: float | None
    rho: float | None
    implied_volatility: float | None
    underlying_price: float | None
    bid: float | None
    ask: float | None
    last: float | None
    mark: float | None
    event_time: datetime
    received_at: datetime
    source_payload: dict[str, Any] | None = None
    #: 'live', 'delayed' or 'frozen' when the broker says (IBKR field 6509), None when it
    #: does not: delayed or frozen values must never pass for live ones.
    market_data: str | None = None
    #: The source (stream) that received it: `ibkr`, `ibkr:alice` (greeksd.sources).
    #: Stamped by the link runner (or replay), not by the Connections, which know
    #: their broker but not which of its logins they serve.
    source: str | None = None

    @classmethod
    def for_contract(
        cls,
        broker: str,
        contract: Contract,
        *,
        event_time: datetime,
        received_at: datetime,
        delta: float | None = None,
        gamma: float | None = None,
        theta: float | None = None,
        vega: float | None = None,
        rho: float | None = None,
        implied_volatility: float | None = None,
        underlying_price: float | None = None,
        bid: float | None = None,
        ask: float | None = None,
        last: float | None = None,
        mark: float | None = None,
        source_payload: dict[str, Any] | None = None,
        market_data: str | None = None,
    ) -> Snapshot:
        """Build a row from a discovered position, so identity fields never diverge."""
        return cls(
            broker,
            *contract.row_identity,
            delta,
            gamma,
            theta,
            vega,
            rho,
            implied_volatility,
            underlying_price,
            bid,
            ask,
            last,
            mark,
            event_time,
            received_at,
            source_payload,
            market_data,
        )

    def conflation_key(self) -> tuple[str, str, str]:
        return (self.broker, self.account_id, self.contract_key)


@dataclass(frozen=True, slots=True)
class Trade:
    """An execution or a strategy-log entry; idempotent on (broker, broker_trade_id).

    Direction lives in `side` ('buy' or 'sell'); `quantity` is always positive (number of
    contracts or shares), so a sum of signed fills is `quantity * (1 if buy else -1)`.
    `contract_key` is None for what is not an option greeksd can identify (stock, futures).
    """

    broker: str
    broker_trade_id: str
    account_id: str
    contract_key: str | None
    symbol: str
    side: str
    quantity: Decimal
    price: Decimal | None
    executed_at: datetime
    source: str = "broker"
    note: str | None = None
    source_payload: dict[str, Any] | None = None


@dataclass(slots=True)
class StreamStatus:
    """Live state of one source, shared by the source (writes) and the API (reads).

    Plain data so broker code can report without importing the supervisor.
    """

    name: str
    state: StreamState = StreamState.DISCONNECTED
    reason: str | None = None
    since: datetime | None = None
    last_message_at: datetime | None = None
    reconnects: int = 0
    restarts: int = 0
    last_error: str | None = None
    subscriptions: int = 0
    ticks: int = 0
    rejected_frames: int = 0
    reachability_probes: int = 0
    counters: Any = None
    """The broker's own typed counters and facts (a dataclass its Connection updates,
    e.g. trades seen, channel retries, contracts left out); shown flat in `as_json`."""
    coverage: Coverage | None = None
    """Which subscribed contracts receive Greeks (greeksd.coverage), kept across links
    and restarts; made by the supervisor with the service's `GREEKSD_STALE_S`."""
    coverage_reason: str | None = None
    """What coverage names as missing (also while the state stays `connected`)."""
    details: dict[str, Any] = field(default_factory=dict)

    def set_state(self, state: StreamState, reason: str | None = None, *, now: datetime) -> None:
        if state is not self.state or reason != self.reason:
            self.since = now
        self.state = state
        self.reason = reason

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        """The status as JSON; `coverage` is counted at `now` (None: no coverage block,
        for callers without a clock)."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "since": iso(self.since),
            "last_message_at": iso(self.last_message_at),
            "reconnects": self.reconnects,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "subscriptions": self.subscriptions,
            "ticks": self.ticks,
            "rejected_frames": self.rejected_frames,
            "reachability_probes": self.reachability_probes,
            "coverage": (self.coverage.summary(now) if self.coverage is not None and now else None),
            "coverage_reason": self.coverage_reason,
            **(_plain(self.counters) if self.counters is not None else {}),
            **self.details,
        }


def _plain(counters: Any) -> dict[str, Any]:
    """A counters dataclass as JSON-ready fields (datetimes as ISO text)."""
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in dataclasses.asdict(counters).items()
    }


class SnapshotSink(Protocol):
    """Where sources put rows. `put` and `put_trade` never block: a slow database must
    not stall a websocket reader (see greeksd.sink for the conflation policy; trades are
    never conflated)."""

    def put(self, snapshot: Snapshot) -> None: ...

    def put_trade(self, trade: Trade) -> None: ...


class Source(Protocol):
    """A restartable producer of snapshots, run by the supervisor in its own scope."""

    name: str

    async def run(self, sink: SnapshotSink, status: StreamStatus) -> None: ...


class Recorder(Protocol):
    """What a broker stream tells a recording (greeksd.recording writes one). Synchronous
    and called right where the stream acts (no await in between), so the order of records
    is the order in which the stream's state changed. It lives here, below the streams and
    the recording alike, so neither has to import the other."""

    def link(self, broker: str, at: datetime, **details: Any) -> None: ...

    def positions(
        self, broker: str, positions: Sequence[Any], at: datetime, **details: Any
    ) -> None: ...

    def frame(self, broker: str, data: str | bytes, received_at: datetime) -> None: ...
