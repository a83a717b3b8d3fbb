"""A protocol-faithful fake Client Portal Gateway: one HTTPS port (self-signed, trustme)
with the REST calls under /v1/api and the websocket at /v1/api/ws.

It reads and writes the websocket with its own code (`ibkr_wire`, never greeksd's
client), and behaves like the real gateway where clients usually go wrong: text
commands, the `api={"session": …}` cookie, a sparse first market-data message, only
changed fields afterwards, Greeks after prices, smd streams that end `smd_expiry_s` after
they were requested, a lines limit that silently ignores extra subscriptions, a preflight
snapshot that is empty the first time, and no data until /iserver/accounts was called.

Refused commands are logged and kept in `rejections`: an unknown topic or unparseable
command gets `{"error":"Topic unknown …","code":1}`; an smd with unknown arguments or bad
field ids, and any smd before /iserver/accounts, gets nothing at all (no line, no error).

Fault switches (methods, or POST /sim/fault) let tests and demos break it on purpose,
including what real gateways do on their own: `sts` split into partial frames
(`split_sts`), a competing login, a logged-out gateway (401 everywhere), no brokerage
bridge (400 "no bridge" on /iserver), several `tic` replies per `tic` (`tic_replies`),
the first market-data image twice (`duplicate_first_image`), delayed or frozen data
(`availability`, field 6509), numbers as JSON numbers (`numeric_values`), Greeks that
stop for some contracts while their prices go on (`withhold_greeks`), and a lower lines
limit (`line_limit`: subscriptions past it are ignored, silently, as the gateway does).

With `pacing` on it also enforces IBKR's documented REST pacing (`PACING_LIMITS`): a
request over a limit gets 429 and puts the caller in the penalty box for `penalty_s`
(IBKR: about 10 minutes), during which every /v1/api request gets 429 too. Off by
default, because most tests run the client with its own pacing turned off for speed.
"""

from __future__ import annotations

import logging
import math
import secrets
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request, websocket
from quart_trio import QuartTrio

from greeksd.logs import get_logger
from greeksd.model import FUTURE_MONTHS, ContractKey, format_strike
from greeksd.sim import ibkr_wire as w
from greeksd.sim.market import (
    SimContract,
    SyntheticMarket,
    Tick,
    default_contracts,
    futures_option_contracts,
)
from greeksd.sim.symbols import occ_symbol

log = get_logger("greeksd.sim.ibkr")

UNDERLYING_CONIDS = {"AAPL": 265598, "SPY": 756733, "SPX": 416904, "MSFT": 272093, "QQQ": 320227}
# The index conids IBKR's documentation shows for the futures products (ES 11004968, from
# the Web API's "Finding futures options" example); the others are made up.
FUTURES_INDEX_CONIDS = {"ES": 11004968, "CL": 17340715, "ZN": 16614994}
FUTURES_PRODUCT_NAMES = {
    "ES": "E-mini S&P 500",
    "CL": "Light Sweet Crude Oil",
    "ZN": "10-Year T-Note",
}
PRICE_FIELDS = frozenset({w.LAST, w.BID, w.ASK, w.MARK})
GREEK_FIELDS = frozenset({w.DELTA, w.GAMMA, w.THETA, w.VEGA, w.IV})
MALFORMED_FRAMES: tuple[str | bytes, ...] = (
    "not json {",
    "[1, 2, 3]",
    '"just a string"',
    '{"topic":"smd+abc","31":"1"}',
    b"\xff\xfe binary garbage",
)
# IBKR's documented Client Portal pacing, from the protocol notes: at most `count`
# requests in any `window` seconds, overall (None) and per endpoint.
PACING_LIMITS: tuple[tuple[str | None, int, float], ...] = (
    (None, 10, 1.0),
    ("/v1/api/tickle", 1, 1.0),
    ("/v1/api/portfolio/accounts", 1, 5.0),
    ("/v1/api/iserver/account/trades", 1, 5.0),
)
# Windows are judged 10% short: two requests sent exactly one spacing apart can arrive a
# little closer, and network jitter is not an offence.
PACING_SLACK = 0.9
FAULTS = (
    "drop",
    "stall",
    "malformed",
    "expire_session",
    "refuse_ws",
    "slow_rest",
    "throttle",
    "competing",
    "logged_out",
    "no_bridge",
    "split_sts",
    "tic_replies",
    "duplicate_first_image",
    "delayed",
    "frozen",
    "numeric_values",
    "pacing",
    "withhold_greeks",
    "line_limit",
    "restore",
)


@dataclass(frozen=True, slots=True)
class SentTick:
    """One market-data message the simulator queued: what a test compares rows with."""

    conid: int
    key: ContractKey | None  # None for an underlying's price line
    fields: dict[str, str]
    updated_ms: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A client command the gateway did not act on, for tests to read."""

    conn: int
    text: str
    reason: str


@dataclass(slots=True)
class _Line:
    fields: tuple[str, ...]
    requested_at: float
    stage: int = 1  # 0 sparse (sent at subscribe), 1 prices only, 2 everything
    sent: dict[str, str] = field(default_factory=dict)
    imaged: bool = False  # the first message with values went out


@dataclass(eq=False)
class _Conn:
    ident: int
    outbox: trio.MemorySendChannel[str | bytes]
    scope: trio.CancelScope
    logged_in: bool = False
    trades: bool = False  # subscribed to `str`
    lines: dict[int, _Line] = field(default_factory=dict)


def _fmt(value: float, places: int) -> str:
    return f"{value:.{places}f}"


def tick_values(tick: Tick) -> dict[str, str]:
    """The option's field strings as the gateway formats them (IV in percent)."""
    g = tick.greeks
    return {
        w.LAST: _fmt(g.price, 2),
        w.BID: _fmt(tick.bid, 2),
        w.ASK: _fmt(tick.ask, 2),
        w.MARK: _fmt((tick.bid + tick.ask) / 2, 3),
        w.DELTA: _fmt(g.delta, 4),
        w.GAMMA: _fmt(g.gamma, 5),
        w.THETA: _fmt(g.theta, 4),
        w.VEGA: _fmt(g.vega, 4),
        w.IV: _fmt(g.implied_volatility * 100, 1) + "%",
    }


def _expiry(day: date) -> str:
    return day.strftime("%Y%m%d")


def _future_last_day(future: str) -> date:
    """A simulated future's last trading day: the third Friday of its contract month
    (ES's and ZN's rule; close enough for CL in a simulator)."""
    first = date(2000 + int(future[-2:]), FUTURE_MONTHS.index(future[-3]) + 1, 1)
    return first + timedelta(days=(4 - first.weekday()) % 7 + 14)


class IbkrGatewaySim:
    def __init__(
        self,
        contracts: Sequence[SimContract] | None = None,
        *,
        as_of: date | None = None,
        seed: int = 7,
        tick_interval: float | None = 0.05,
        heartbeat_s: float = 10.0,
        smd_expiry_s: float = 600.0,
        max_lines: int = 100,
        account: str = "U1234567",
        username: str = "simuser",
        bare_positions: bool = False,
        tic_replies: int = 1,
        split_sts: bool = False,
        duplicate_first_image: bool = False,
        availability: str = w.REALTIME,
        numeric_values: bool = False,
        pacing: bool = False,
        penalty_s: float = 600.0,
        penalty_retry_after: bool = False,
        futures_options: int = 0,
    ) -> None:
        """`futures_options`: add that many futures options (ES, CL, ZN round-robin,
        greeksd.sim.market.futures_option_contracts) to the book, served as real gateways
        serve `FOP` positions; a `contracts` list may hold futures options too."""
        as_of = as_of or date.today()
        book = [*(contracts or default_contracts(as_of))]
        book += futures_option_contracts(as_of, futures_options) if futures_options else []
        self.market = SyntheticMarket(book, as_of=as_of, seed=seed)
        self.tick_interval = tick_interval
        self.heartbeat_s = heartbeat_s
        self.smd_expiry_s = smd_expiry_s
        self.max_lines = max_lines
        self.account = account
        self.username = username
        self.bare_positions = bare_positions
        # what real gateways do on their own (see the module docstring)
        self.tic_replies = tic_replies
        self.split_sts = split_sts
        self.duplicate_first_image = duplicate_first_image
        self.availability = availability
        self.numeric_values = numeric_values
        self.pacing = pacing
        self.penalty_s = penalty_s
        self.penalty_retry_after = penalty_retry_after  # a Retry-After header on the 429s
        self.pacing_violations: list[tuple[float, str]] = []  # (trio time, path)
        self.penalized_requests = 0  # requests that arrived inside the penalty box
        self._recent: dict[str | None, deque[float]] = {}
        self._penalty_until: float | None = None
        self.url = ""
        self.ca_file: Path | None = None
        self.conids: dict[ContractKey, int] = {}
        self.underlying_conids = dict(UNDERLYING_CONIDS)
        self.sent_ticks: list[SentTick] = []
        self.received: list[tuple[float, str]] = []  # (trio time, client text)
        self.ignored_subscriptions: list[int] = []
        self.rejections: list[Rejection] = []
        self.ws_connects = 0
        self.market_ticks = 0
        self.dropped_ticks = 0  # option market-data messages the full outbox refused
        self.logins: list[str] = []  # "cookie", "legacy" or "cookieless", per socket
        self.rest_calls: list[str] = []
        self.rest_log: list[tuple[float, str]] = []  # (trio time, path) per REST request
        self.executions: list[dict[str, Any]] = []  # what /iserver/account/trades lists
        self.extra_positions: list[dict[str, Any]] = []  # e.g. a futures option (FOP)
        self._by_conid: dict[int, SimContract] = {}
        self._latest: dict[int, dict[str, str]] = {}
        self._conns: dict[int, _Conn] = {}
        self._next_conn = 0
        self._session = secrets.token_hex(16)
        self._authenticated = True
        self._competing = False
        self._gateway_login = True  # the user's browser login to the gateway itself
        self._bridge = True  # the brokerage session behind /iserver
        self._iserver_accounts_called = False
        self._preflighted: set[int] = set()
        self._stalled = False
        self._refuse_ws = False
        self._rest_delay = 0.0
        self._throttle = 0
        self.greeks_withheld: set[int] = set()  # option conids whose ticks lose their Greeks
        for contract in self.market.contracts:
            self._assign_conid(contract)
        self.app = self._build_app()

    # ---- positions ------------------------------------------------------------------
    def _assign_conid(self, contract: SimContract) -> int:
        self.underlying_conids.setdefault(contract.underlying, 900000 + len(self.underlying_conids))
        conid = self.conids.setdefault(contract.key, 700000001 + len(self.conids))
        self._by_conid.setdefault(conid, contract)
        return conid

    def conid_of(self, key: ContractKey) -> int:
        return self.conids[key]

    def open_position(self, contract: SimContract) -> int:
        """Add a held option at runtime; returns its conid."""
        self.market.add_contract(contract)
        return self._assign_conid(contract)

    def close_position(self, key: ContractKey) -> None:
        self.market.remove_contract(key)

    def _position_json(self, c: SimContract) -> dict[str, Any]:
        if c.key.is_future_option:
            return self._fop_position_json(c)
        k = c.key
        strike = format_strike(k.strike)
        local = occ_symbol(k)
        row: dict[str, Any] = {
            "acctId": self.account,
            "conid": self.conids[k],
            "assetClass": "OPT",
            "contractDesc": f"{c.underlying} {k.expiration:%b%Y}".upper()
            + f" {strike} {k.right.value} [{local} {c.multiplier}]",
            "position": float(c.quantity),
            "mktPrice": 0.0,
            "mktValue": 0.0,
            "avgCost": 0.0,
            "currency": "USD",
            "ticker": c.underlying,
            "undSym": c.underlying,
            "undConid": self.underlying_conids[c.underlying],
            "multiplier": float(c.multiplier),
            "expiry": _expiry(k.expiration),
            "putOrCall": k.right.value,
            "strike": strike,
        }
        if self.bare_positions:
            for key in ("expiry", "putOrCall", "strike", "multiplier"):
                row.pop(key)
            row["contractDesc"] = c.underlying
        return row

    def _secdef_json(self, c: SimContract) -> dict[str, Any]:
        if c.key.is_future_option:
            return self._fop_secdef_json(c)
        return {
            **self._position_json(c),
            "tradingClass": c.key.root,
            "expiry": _expiry(c.key.expiration),
            "putOrCall": c.key.right.value,
            "strike": format_strike(c.key.strike),
            "multiplier": float(c.multiplier),
        }

    # ---- futures options (FOP) ------------------------------------------------------
    # Shapes from real gateways: a FOP position names its trading class only in
    # `contractDesc` and leaves expiry, right, multiplier null, strike and undConid 0 (a
    # captured positions page, tests/fixtures/real/ibkr/fop-positions.json); /trsrv/secdef
    # has the fields of IBKR's OpenAPI example (no trading class, no local symbol);
    # /iserver/contract/{conid}/info those of IBKR's documented example
    # (https://www.interactivebrokers.com/campus/ibkr-api-page/cpapi-v1/, contract info),
    # with a future's `local_symbol` 'ESZ6' and `contract_month` '202612'.
    def _future_conid(self, c: SimContract) -> int:
        return self.underlying_conids[c.underlying]

    def _futures_by_conid(self) -> dict[int, SimContract]:
        """One held futures option per future conid (what the future's records need)."""
        return {self._future_conid(c): c for c in self.market.contracts if c.key.is_future_option}

    def _fop_position_json(self, c: SimContract) -> dict[str, Any]:
        k = c.key
        root = k.future[:-3]
        desc = f"{root:<7}{k.expiration:%b%Y}".upper() + f" {format_strike(k.strike)}"
        return {
            "acctId": self.account,
            "conid": self.conids[k],
            "contractDesc": f"{desc} {k.right.value} ({k.root})",
            "position": float(c.quantity),
            "mktPrice": 0.0,
            "mktValue": 0.0,
            "currency": "USD",
            "avgCost": 0.0,
            "avgPrice": 0.0,
            "realizedPnl": 0.0,
            "unrealizedPnl": 0.0,
            "exchs": None,
            "expiry": None,
            "putOrCall": None,
            "multiplier": None,
            "strike": 0.0,
            "exerciseStyle": None,
            "conExchMap": [],
            "assetClass": "FOP",
            "undConid": 0,
            "model": "",
        }

    def _fop_secdef_json(self, c: SimContract) -> dict[str, Any]:
        k, root = c.key, c.key.future[:-3]
        return {
            "conid": self.conids[k],
            "currency": "USD",
            "allExchanges": c.exchange,
            "listingExchange": c.exchange,
            "countryCode": "US",
            "name": FUTURES_PRODUCT_NAMES.get(root, root),
            "assetClass": "FOP",
            "expiry": _expiry(k.expiration),
            "lastTradingDay": _expiry(k.expiration),
            "group": None,
            "putOrCall": k.right.value,
            "sector": None,
            "sectorGroup": None,
            "strike": format_strike(k.strike),
            "ticker": root,
            "undConid": self._future_conid(c),
            "multiplier": float(c.multiplier),
            "type": "",
            "hasOptions": False,
            "fullName": f"{root} {k.expiration:%b%d'%y} {format_strike(k.strike)}",
            "isUS": True,
            "isEventContract": False,
        }

    def _future_secdef_json(self, conid: int, c: SimContract) -> dict[str, Any]:
        root = c.key.future[:-3]
        return {
            "conid": conid,
            "currency": "USD",
            "allExchanges": c.exchange,
            "listingExchange": c.exchange,
            "countryCode": "US",
            "name": FUTURES_PRODUCT_NAMES.get(root, root),
            "assetClass": "FUT",
            "expiry": _expiry(_future_last_day(c.key.future)),
            "lastTradingDay": _expiry(_future_last_day(c.key.future)),
            "putOrCall": None,
            "strike": "0",
            "ticker": root,
            "undConid": FUTURES_INDEX_CONIDS.get(root, 0),
            "multiplier": float(c.multiplier),
            "type": "",
            "hasOptions": True,
            "fullName": f"{root} {_future_last_day(c.key.future):%b%d'%y}",
            "isUS": True,
            "isEventContract": False,
        }

    def _contract_info_json(self, conid: int) -> dict[str, Any] | None:
        """/iserver/contract/{conid}/info for a held futures option or its future."""
        option = self._by_conid.get(conid)
        future = self._futures_by_conid().get(conid)
        c = option if option is not None and option.key.is_future_option else future
        if c is None:
            return None
        k, root = c.key, c.key.future[:-3]
        month = FUTURE_MONTHS.index(k.future[-3]) + 1
        common = {
            "cfi_code": "",
            "symbol": root,
            "cusip": None,
            "con_id": conid,
            "industry": None,
            "valid_exchanges": c.exchange,
            "allow_sell_long": False,
            "is_zero_commission_security": False,
            "contract_clarification_type": None,
            "classifier": None,
            "currency": "USD",
            "text": None,
            "r_t_h": False,
            "multiplier": format_strike(c.multiplier),
            "underlying_issuer": None,
            "company_name": FUTURES_PRODUCT_NAMES.get(root, root),
            "smart_available": False,
            "exchange": c.exchange,
            "category": None,
        }
        local_future = f"{root}{k.future[-3]}{k.future[-1]}"  # IBKR's 'ESZ6'
        if c is option:
            strike = format_strike(k.strike)
            return common | {
                "expiry_full": f"20{k.future[-2:]}{month:02d}",
                "maturity_date": _expiry(k.expiration),
                "instrument_type": "FOP",
                "trading_class": k.root,
                "local_symbol": f"{k.root}{k.future[-3]}{k.future[-1]} {k.right.value}{strike}",
                "underlying_con_id": self._future_conid(c),
                "contract_month": f"20{k.future[-2:]}{month:02d}",
            }
        return common | {
            "expiry_full": f"20{k.future[-2:]}{month:02d}",
            "maturity_date": _expiry(_future_last_day(k.future)),
            "instrument_type": "FUT",
            "trading_class": root,
            "local_symbol": local_future,
            "underlying_con_id": FUTURES_INDEX_CONIDS.get(root, 0),
            "contract_month": f"20{k.future[-2:]}{month:02d}",
        }

    # ---- executions -----------------------------------------------------------------
    def execute(
        self, contract: SimContract, side: str, quantity: Decimal, price: Decimal
    ) -> dict[str, Any]:
        """A fill (`side` 'B' or 'S', `quantity` > 0): sent on `str` to subscribed sockets
        and listed by /iserver/account/trades from now on. Returns the execution."""
        conid = self._assign_conid(contract)
        k = contract.key
        now = datetime.now(UTC)
        verb = "Bought" if side == "B" else "Sold"
        execution = {
            "execution_id": f"0000{conid:x}.{len(self.executions) + 1:08x}.01.01",
            "symbol": contract.underlying,
            "supports_tax_opt": "1",
            "side": side,
            "order_description": f"{verb} {quantity} @ {price} on CBOE",
            "trade_time": now.strftime("%Y%m%d-%H:%M:%S"),
            "trade_time_r": int(now.timestamp() * 1000),
            "size": float(quantity),
            "price": str(price),
            "order_ref": f"sim-{len(self.executions) + 1}",
            "exchange": "CBOE",
            "commission": "1.05",
            "net_amount": float(quantity * price * contract.multiplier),
            "account": self.account,
            "accountCode": self.account,
            "company_name": contract.underlying,
            "contract_description_1": f"{contract.underlying} {k.expiration:%b%d'%y}".upper()
            + f" {format_strike(k.strike)} {'Call' if k.right.value == 'C' else 'Put'}",
            "sec_type": "OPT",
            "listing_exchange": "CBOE",
            "conid": conid,
            "conidEx": str(conid),
            "clearing_id": "IB",
            "clearing_name": "IB",
            "liquidation_trade": "0",
        }
        self.executions.append(execution)
        self.resend_execution(execution)
        return execution

    def resend_execution(self, execution: dict[str, Any]) -> None:
        """Send an execution again on `str` (the gateway repeats fills, e.g. on replay)."""
        for conn in self._conns.values():
            if conn.trades:
                self._send(conn, w.trades([execution]))

    # ---- faults ---------------------------------------------------------------------
    def drop_connections(self) -> None:
        for conn in list(self._conns.values()):
            conn.scope.cancel()

    def stall(self) -> None:
        """Send nothing at all (no heartbeats either) until `restore`."""
        self._stalled = True

    def send_malformed(self) -> None:
        for conn in self._conns.values():
            for frame in MALFORMED_FRAMES:
                self._send(conn, frame)

    def send_frame(self, frame: str | bytes) -> None:
        """Send this exact frame to every logged-in socket: a repeated or late message,
        as the fixture generator injects them."""
        for conn in self._conns.values():
            if conn.logged_in:
                self._send(conn, frame)

    def expire_session(self) -> None:
        """Brokerage session gone (daily reset): sts false, REST unauthenticated."""
        self._authenticated = False
        self._broadcast_sts()

    def refuse_websocket(self) -> None:
        self._refuse_ws = True

    def slow_rest(self, seconds: float) -> None:
        self._rest_delay = seconds

    def throttle(self, requests: int) -> None:
        """The next `requests` REST calls get 429."""
        self._throttle = requests

    def compete(self) -> None:
        """Another login took the brokerage session: sts and auth status say
        `competing: true` (still authenticated) and market data stops until `restore`."""
        self._competing = True
        self._broadcast_sts()

    def log_out(self) -> None:
        """The gateway itself is logged out (the user's browser login is gone): every
        /v1/api call, /tickle included, answers 401; websocket upgrades are refused."""
        self._gateway_login = False
        self._broadcast_sts()

    def drop_bridge(self) -> None:
        """No brokerage session behind a logged-in gateway: /iserver/* (except
        /iserver/auth/*) answers 400 "no bridge", auth status says not authenticated
        and not connected."""
        self._bridge = False
        self._broadcast_sts()

    def withhold_greeks(self, count: int | None = None) -> None:
        """From now on the first `count` option contracts (all: None) get prices but no
        Greeks, as an expired or half-served smd stream does."""
        conids = [self.conids[c.key] for c in self.market.contracts]
        self.greeks_withheld = set(conids if count is None else conids[:count])

    def restore(self) -> None:
        """Clear every fault (not the dialect options such as `split_sts`); a
        re-authenticated session has a new token and needs /iserver/accounts again."""
        if not self._session_ok():
            self._session = secrets.token_hex(16)
            self._iserver_accounts_called = False
        changed = not self._session_ok() or self._competing
        self._authenticated = self._gateway_login = self._bridge = True
        self._competing = False
        if changed:
            self._broadcast_sts()
        self._stalled = self._refuse_ws = False
        self._rest_delay, self._throttle = 0.0, 0
        self.greeks_withheld = set()
        self._penalty_until = None

    def apply_fault(self, name: str, value: float | None = None) -> None:
        """`value`: seconds for slow_rest, requests for throttle, replies for
        tic_replies (default 2); a dialect switch is turned off by value 0."""
        on = value is None or value != 0
        actions = {
            "drop": self.drop_connections,
            "stall": self.stall,
            "malformed": self.send_malformed,
            "expire_session": self.expire_session,
            "refuse_ws": self.refuse_websocket,
            "competing": self.compete,
            "logged_out": self.log_out,
            "no_bridge": self.drop_bridge,
            "restore": self.restore,
            "slow_rest": lambda: self.slow_rest(value or 0.0),
            "throttle": lambda: self.throttle(int(value or 0)),
            "split_sts": lambda: setattr(self, "split_sts", on),
            "tic_replies": lambda: setattr(self, "tic_replies", 2 if value is None else int(value)),
            "duplicate_first_image": lambda: setattr(self, "duplicate_first_image", on),
            "delayed": lambda: setattr(self, "availability", w.DELAYED if on else w.REALTIME),
            "frozen": lambda: setattr(self, "availability", w.FROZEN if on else w.REALTIME),
            "numeric_values": lambda: setattr(self, "numeric_values", on),
            "pacing": lambda: setattr(self, "pacing", on),
            "withhold_greeks": lambda: self.withhold_greeks(None if value is None else int(value)),
            "line_limit": lambda: setattr(self, "max_lines", int(value or 0)),
        }
        if name not in actions:
            raise ValueError(f"unknown fault {name!r}; use one of {', '.join(FAULTS)}")
        log.info("ibkr_sim_fault", fault=name, value=value)
        actions[name]()

    # ---- REST pacing ----------------------------------------------------------------
    def _pace(self, path: str) -> Response | None:
        """The 429 for a request over IBKR's limits or inside the penalty box, else None
        (and the request counts against the limits)."""
        now = trio.current_time()
        if self._penalty_until is not None and now < self._penalty_until:
            self.penalized_requests += 1
            log.warning("ibkr_sim_penalized_request", path=path)
            return self._too_many(now)
        windows = [
            (self._recent.setdefault(endpoint, deque()), count, window * PACING_SLACK)
            for endpoint, count, window in PACING_LIMITS
            if endpoint is None or endpoint == path
        ]
        for recent, _count, window in windows:
            while recent and now - recent[0] >= window:
                recent.popleft()
        if any(len(recent) >= count for recent, count, _window in windows):
            self.pacing_violations.append((now, path))
            self._penalty_until = now + self.penalty_s
            log.warning("ibkr_sim_penalty_box", path=path, seconds=self.penalty_s)
            return self._too_many(now)
        for recent, _count, _window in windows:
            recent.append(now)
        return None

    def _too_many(self, now: float) -> Response:
        headers = {}
        if self.penalty_retry_after and self._penalty_until is not None:
            headers["Retry-After"] = str(math.ceil(self._penalty_until - now))
        return Response("Too Many Requests", status=429, headers=headers)

    # ---- websocket ------------------------------------------------------------------
    def _send(self, conn: _Conn, frame: str | bytes) -> bool:
        """Queue `frame` for the socket; False when it was not (stalled, or the outbox is
        full because the socket cannot keep up: the benchmark counts those)."""
        if self._stalled:
            return False
        try:
            conn.outbox.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.warning("ibkr_sim_outbox_dropped", conn=conn.ident)
            return False
        return True

    def _session_ok(self) -> bool:
        """A brokerage session exists (it may still be competing)."""
        return self._authenticated and self._gateway_login and self._bridge

    def _problem(self) -> str:
        if not self._gateway_login:
            return "not logged in"
        if not self._bridge:
            return "no bridge"
        return "" if self._authenticated else "session expired"

    def _broadcast_sts(self) -> None:
        for conn in self._conns.values():
            if conn.logged_in:
                self._send_sts(conn)

    def _send_sts(self, conn: _Conn) -> None:
        """The auth status, whole, or (`split_sts`) as real gateways also send it: three
        frames `{"competing"}`, `{"message"}`, then `{"authenticated", ...}`."""
        competing, message = self._competing, self._problem()
        rest = {
            "authenticated": self._session_ok(),
            "fail": "",
            "serverName": "greeksd-sim",
            "serverVersion": "sim",
            "username": self.username,
        }
        if self.split_sts:
            for part in ({"competing": competing}, {"message": message}, rest):
                self._send(conn, w.sts(part))
        else:
            self._send(conn, w.sts({**rest, "competing": competing, "message": message}))

    def _reject(self, conn: _Conn, text: str, reason: str) -> None:
        self.rejections.append(Rejection(conn.ident, text[:200], reason))
        log.warning("ibkr_sim_rejected", conn=conn.ident, command=text[:80], reason=reason)

    def _login(self, conn: _Conn, how: str) -> None:
        self.logins.append(how)
        conn.logged_in = True
        self._send(conn, w.logged_in(self.username))
        self._send_sts(conn)
        self._send(conn, w.accounts(self.account))

    def _handle_text(self, conn: _Conn, text: str) -> None:
        self.received.append((trio.current_time(), text))
        try:
            command = w.parse_command(text)
        except w.CommandError as exc:
            self._reject(conn, text, exc.reason)
            if exc.answer is not None:
                self._send(conn, exc.answer)
            return
        if command.topic == "session":  # the legacy handshake
            if command.text == self._session and not conn.logged_in:
                self._login(conn, "legacy")
            elif not conn.logged_in:
                self._reject(conn, text, "legacy handshake with an unknown session")
                self._send(conn, w.topic_unknown(text))
            return
        if not conn.logged_in:  # a cookie-less socket: the local gateway's session serves it
            self._login(conn, "cookieless")
        if command.topic == "tic":
            for _ in range(self.tic_replies):
                now_ms = int(time.time() * 1000)
                self._send(conn, w.tic_reply(self._session_ok(), f"sim{conn.ident}", now_ms))
        elif command.topic == "ech":
            self._send(conn, text)
        elif command.topic in {"str", "utr"}:
            conn.trades = command.topic == "str"
        elif command.topic == "umd":
            conn.lines.pop(command.conid or 0, None)
        elif not self._iserver_accounts_called:
            self._reject(conn, text, "smd before /iserver/accounts was called")
            self.ignored_subscriptions.append(command.conid or 0)  # silently, like the gateway
        else:
            self._subscribe(conn, command.conid or 0, command.fields)

    def _subscribe(self, conn: _Conn, conid: int, fields: tuple[str, ...]) -> None:
        now = trio.current_time()
        self._expire(conn, now)
        line = conn.lines.get(conid)
        if line is not None:  # a repeat request renews the 10-minute stream, may add fields
            line.requested_at = now
            line.fields = tuple(dict.fromkeys((*line.fields, *fields)))
            return
        if len(conn.lines) >= self.max_lines:
            self.ignored_subscriptions.append(conid)  # silently, like the gateway
            return
        conn.lines[conid] = _Line(fields, now)
        bookkeeping = {w.MARKER: "q0", w.AVAILABILITY: self.availability}
        self._send(conn, w.market_data(conid, bookkeeping, int(time.time() * 1000)))

    def _expire(self, conn: _Conn, now: float) -> None:
        for conid in [
            c for c, line in conn.lines.items() if now - line.requested_at >= self.smd_expiry_s
        ]:
            del conn.lines[conid]

    def lines(self) -> set[int]:
        """Conids with a live (requested, not expired) smd stream on any socket."""
        now = trio.current_time()
        return {
            conid
            for conn in self._conns.values()
            for conid, line in conn.lines.items()
            if now - line.requested_at < self.smd_expiry_s
        }

    def subscribed(self, keys: Collection[ContractKey]) -> bool:
        """A client streams every one of these contracts (greeksd.sim.readiness)."""
        conids = {self.conids.get(key) for key in keys}
        return None not in conids and conids <= self.lines()

    def push(self, conid: int, values: dict[str, str]) -> None:
        """Send exactly these field values to every subscriber of `conid` (tests use it
        for partial updates and explicit clears)."""
        self._deliver(conid, values, raw=True)

    def _deliver(self, conid: int, values: dict[str, str], *, raw: bool = False) -> None:
        if conid in self.greeks_withheld and not raw:
            values = {k: v for k, v in values.items() if k not in GREEK_FIELDS}
        self._latest.setdefault(conid, {}).update(values)
        if not self._session_ok() or self._competing or self._stalled:
            return
        now = trio.current_time()
        key = next((k for k, c in self.conids.items() if c == conid), None)
        for conn in self._conns.values():
            self._expire(conn, now)
            line = conn.lines.get(conid)
            if line is None:
                continue
            wanted = {
                k: v
                for k, v in values.items()
                if raw or (k in line.fields and (line.stage > 1 or k in PRICE_FIELDS))
            }
            changed = {k: v for k, v in wanted.items() if raw or line.sent.get(k) != v}
            line.stage += 1
            if not changed:
                continue
            line.sent.update(changed)
            updated = int(time.time() * 1000)
            frame = w.market_data(conid, changed, updated, numeric=self.numeric_values)
            copies = 2 if self.duplicate_first_image and not line.imaged else 1
            line.imaged = True
            for _ in range(copies):
                if self._send(conn, frame):
                    self.sent_ticks.append(SentTick(conid, key, changed, updated))
                elif key is not None:
                    self.dropped_ticks += 1

    def tick(self) -> Tick:
        """Advance the market one step and send what changed."""
        tick = self.market.next_tick()
        self.market_ticks += 1
        self._deliver(
            self.underlying_conids[tick.contract.underlying],
            {w.LAST: _fmt(tick.underlying_price, 2)},
        )
        self._deliver(self.conids[tick.contract.key], tick_values(tick))
        return tick

    async def _run_conn(
        self, conn: _Conn, outbox: trio.MemoryReceiveChannel[str | bytes], session: str | None
    ) -> None:
        ws = websocket._get_current_object()  # type: ignore[attr-defined]

        async def writer() -> None:
            async for frame in outbox:
                if not self._stalled:
                    await ws.send(frame)

        async def heartbeat() -> None:
            while True:
                await trio.sleep(self.heartbeat_s)
                self._send(conn, w.heartbeat(int(time.time() * 1000)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(heartbeat)
            if session is not None and session == self._session:
                self._login(conn, "cookie")
            else:
                self._send(conn, w.WAITING_FOR_SESSION)
            while True:
                data = await ws.receive()
                self._handle_text(conn, data if isinstance(data, str) else data.decode())

    # ---- HTTP -----------------------------------------------------------------------
    def _build_app(self) -> QuartTrio:
        app = QuartTrio("greeksd-ibkr-sim")
        sim = self

        @app.websocket("/v1/api/ws")
        async def ws_endpoint() -> Any:
            if sim._refuse_ws or not sim._gateway_login:
                return Response("websocket refused", status=401)
            await websocket.accept()
            sim.ws_connects += 1
            sim._next_conn += 1
            send, receive = trio.open_memory_channel[str | bytes](10000)
            conn = _Conn(sim._next_conn, send, trio.CancelScope())
            sim._conns[conn.ident] = conn
            try:
                with conn.scope:
                    await sim._run_conn(
                        conn, receive, w.session_from_cookie(websocket.headers.get("Cookie"))
                    )
            finally:
                del sim._conns[conn.ident]
            return None

        @app.before_request
        async def pace() -> Any:
            sim.rest_calls.append(request.path)
            sim.rest_log.append((trio.current_time(), request.path))
            if sim._rest_delay:
                await trio.sleep(sim._rest_delay)
            if sim._throttle > 0 and request.path.startswith("/v1/api"):
                sim._throttle -= 1
                return Response("Too Many Requests", status=429)
            if sim.pacing and request.path.startswith("/v1/api"):
                refused = sim._pace(request.path)
                if refused is not None:
                    return refused
            guarded = (
                "/v1/api/iserver/accounts",
                "/v1/api/portfolio",
                "/v1/api/trsrv",
                "/v1/api/iserver/marketdata",
                "/v1/api/iserver/account",
            )
            path = request.path
            if not sim._gateway_login and path.startswith("/v1/api"):
                return {"error": "not authenticated"}, 401  # /tickle too
            if (
                not sim._bridge
                and path.startswith("/v1/api/iserver/")
                and not path.startswith("/v1/api/iserver/auth/")
            ):
                return {"error": "no bridge", "statusCode": 400}, 400
            if not sim._authenticated and path.startswith(guarded):
                return {"error": "not authenticated"}, 401
            return None

        @app.route("/v1/api/iserver/auth/status", methods=["GET", "POST"])
        async def auth_status() -> Any:
            return sim._auth_json()

        @app.route("/v1/api/tickle", methods=["GET", "POST"])
        async def tickle() -> Any:
            return {
                "session": sim._session,
                "ssoExpires": 600000,
                "collission": False,
                "userId": 1,
                "iserver": {"authStatus": sim._auth_json()},
            }

        @app.get("/v1/api/iserver/accounts")
        async def iserver_accounts() -> Any:
            sim._iserver_accounts_called = True
            return {
                "accounts": [sim.account],
                "selectedAccount": sim.account,
                "aliases": {sim.account: sim.account},
                "isPaper": False,
            }

        @app.get("/v1/api/portfolio/accounts")
        async def portfolio_accounts() -> Any:
            return [
                {
                    "id": sim.account,
                    "accountId": sim.account,
                    "currency": "USD",
                    "type": "INDIVIDUAL",
                    "accountTitle": "greeksd sim",
                }
            ]

        @app.get("/v1/api/portfolio/<account>/positions/<int:page>")
        async def positions(account: str, page: int) -> Any:
            if account != sim.account:
                return {"error": f"unknown account {account}"}, 400
            rows = [sim._position_json(c) for c in sim.market.contracts] + sim.extra_positions
            rows.insert(
                0,
                {
                    "acctId": sim.account,
                    "conid": 265598,
                    "assetClass": "STK",
                    "contractDesc": "AAPL",
                    "position": 100.0,
                    "ticker": "AAPL",
                },
            )
            return rows[page * 100 : (page + 1) * 100]

        @app.get("/v1/api/trsrv/secdef")
        async def secdef() -> Any:
            wanted = {int(c) for c in request.args.get("conids", "").split(",") if c.isdigit()}
            known = [sim._by_conid[c] for c in sorted(wanted) if c in sim._by_conid]
            futures = sim._futures_by_conid()
            held = [sim._future_secdef_json(c, futures[c]) for c in sorted(wanted) if c in futures]
            return {"secdef": [sim._secdef_json(c) for c in known] + held}

        @app.get("/v1/api/iserver/contract/<int:conid>/info")
        async def contract_info(conid: int) -> Any:
            info = sim._contract_info_json(conid)
            if info is None:
                return {"error": f"Invalid conid {conid}", "statusCode": 400}, 400
            return info

        @app.get("/v1/api/iserver/account/trades")
        async def trades() -> Any:
            return list(sim.executions)

        @app.get("/v1/api/iserver/marketdata/snapshot")
        async def snapshot() -> Any:
            fields = request.args.get("fields", "").split(",")
            rows = []
            for text in request.args.get("conids", "").split(","):
                if not text.isdigit():
                    continue
                conid = int(text)
                row: dict[str, Any] = {"conid": conid, "conidEx": text}
                if conid in sim._preflighted and sim._iserver_accounts_called:
                    values = sim._latest.get(conid, {})
                    row |= {f: values[f] for f in fields if f in values}
                    row |= {w.AVAILABILITY: sim.availability, "_updated": int(time.time() * 1000)}
                sim._preflighted.add(conid)
                rows.append(row)
            return rows

        @app.post("/sim/fault")
        async def fault() -> Any:
            body = await request.get_json(force=True, silent=True) or {}
            try:
                value = body.get("value")
                sim.apply_fault(str(body.get("fault")), None if value is None else float(value))
            except ValueError as exc:
                return {"error": str(exc)}, 400
            return {"ok": True}

        return app

    def _auth_json(self) -> dict[str, Any]:
        return {
            "authenticated": self._session_ok(),
            "competing": self._competing,
            "connected": self._gateway_login and self._bridge,
            "message": self._problem(),
            "fail": "",
            "serverInfo": {"serverName": "greeksd-sim"},
        }

    # ---- lifecycle ------------------------------------------------------------------
    async def _pump(self) -> None:
        if self.tick_interval is None:
            return
        while True:
            await trio.sleep(self.tick_interval)
            self.tick()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `task_status.started(url)` once listening."""
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
        with tempfile.TemporaryDirectory(prefix="greeksd-ibkr-sim-") as tmp:
            pem = Path(tmp) / "server.pem"
            cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
            self.ca_file = Path(tmp) / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            config = Config()
            config.bind = [f"{host}:{port}"]
            config.certfile = config.keyfile = str(pem)
            config.accesslog = None
            # the library logger, so greeksd's handler formats (and filters) its lines
            config.errorlog = logging.getLogger("hypercorn.error")
            config.graceful_timeout = 0.1
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(hypercorn_serve, self.app, config)
                self.url = "https://" + binds[0].split("://", 1)[1]
                nursery.start_soon(self._pump)
                log.info("ibkr_sim_listening", url=self.url, contracts=len(self.conids))
                task_status.started(self.url)


@asynccontextmanager
async def open_ibkr_sim(
    contracts: Sequence[SimContract] | None = None,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    **options: Any,
) -> AsyncIterator[IbkrGatewaySim]:
    """`async with open_ibkr_sim(tick_interval=0.01) as sim:` — listening on `sim.url`."""
    sim = IbkrGatewaySim(contracts, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, host, port)
        yield sim
        nursery.cancel_scope.cancel()


async def run_ibkr_sim(
    port: int = 5000,
    *,
    host: str = "127.0.0.1",
    contracts: int = 8,
    tick_interval: float = 0.2,
    smd_expiry_s: float = 600.0,
) -> None:
    """`greeksd sim ibkr --port 5000`: serve until interrupted, enforcing IBKR's pacing
    (greeksd's client keeps to it; `POST /sim/fault {"fault": "pacing", "value": 0}`
    turns it off)."""
    sim = IbkrGatewaySim(
        default_contracts(date.today(), contracts),
        tick_interval=tick_interval,
        smd_expiry_s=smd_expiry_s,
        pacing=True,
    )
    await sim.serve(host, port)
