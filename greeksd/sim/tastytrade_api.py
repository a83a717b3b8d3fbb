"""The Tastytrade REST endpoints the SDK calls, plus the whole Tastytrade simulator.

Bodies use Tastytrade's shapes (dasherized keys, `{"data": ...}` wrapping, lists as
`{"data": {"items": [...]}}`) with every field the SDK's pydantic models require, so the
real SDK validates them. `/api-quote-tokens` points at the simulator's DXLink server.
Futures options in the book (`futures_options=N`) are held as 'Future Option' positions
and found through `/instruments/future-options` and `/instruments/futures`, which give
their and their futures' streamer symbols.
`/sim/...` is the control surface (faults, positions) for people driving the CLI
simulator by hand; tests call the same methods directly.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

from greeksd.logs import get_logger
from greeksd.model import ContractKey
from greeksd.sim.dxlink_server import DxLinkServer, SentGreeks
from greeksd.sim.market import (
    SimContract,
    SyntheticMarket,
    default_contracts,
    futures_option_contracts,
)
from greeksd.sim.symbols import (
    dxfeed_future,
    dxfeed_future_option,
    dxfeed_option,
    occ_symbol,
    tastytrade_future,
    tastytrade_future_option,
)

log = get_logger("greeksd.sim.tastytrade")

SIM_SECRET = "sim-provider-secret"
SIM_REFRESH = "sim-refresh-token"
SIM_ACCOUNT = "5WT00001"
_CREATED = "2024-01-02T15:00:00.000+00:00"


@dataclass
class TastytradeSim:
    """Handle on a running simulator: URLs, counters, fault switches and positions."""

    market: SyntheticMarket
    dxlink: DxLinkServer
    account: str = SIM_ACCOUNT
    secret: str = SIM_SECRET
    refresh_token: str = SIM_REFRESH
    api_url: str = ""
    #: holdings that are not options, which every account also shows (a stock)
    extra_positions: list[dict[str, Any]] = field(default_factory=list)
    access_tokens: set[str] = field(default_factory=set)
    quote_tokens: set[str] = field(default_factory=set)
    quote_token_requests: int = 0
    oauth_requests: int = 0
    #: what /accounts/{n}/transactions serves, oldest first
    transactions: list[dict[str, Any]] = field(default_factory=list)
    transaction_requests: int = 0
    #: `GET /instruments/future-options/{symbol}` calls, by symbol
    future_option_requests: dict[str, int] = field(default_factory=dict)

    @property
    def dxlink_url(self) -> str:
        return f"ws://127.0.0.1:{self.dxlink.port}/realtime"

    @property
    def sent_events(self) -> list[SentGreeks]:
        return self.dxlink.sent_events

    def subscribed(self, keys: Collection[ContractKey]) -> bool:
        """One authorized DXLink channel has the Greeks of every one of these contracts
        (greeksd.sim.readiness)."""
        by_key = {c.key: c for c in self.market.contracts}
        wanted = {dxfeed_option(by_key[key]) for key in keys}
        return any(
            wanted <= {s for kind, s in channel.subscriptions if kind == "Greeks"}
            for conn in self.dxlink.connections.values()
            if conn.authorized
            for channel in conn.channels.values()
        )

    # faults -----------------------------------------------------------------

    async def drop(self) -> None:
        await self.dxlink.drop()

    def stall(self, on: bool = True) -> None:
        self.dxlink.stall(on)

    async def send_malformed(self, frame: str | None = None) -> None:
        await (self.dxlink.send_malformed(frame) if frame else self.dxlink.send_malformed())

    async def send_error(self, error: str = "UNKNOWN", message: str = "simulated error") -> None:
        await self.dxlink.send_error(error, message)

    def refuse_tokens(self, on: bool = True) -> None:
        """Answer every AUTH with AUTH_STATE UNAUTHORIZED, however fresh the token."""
        self.dxlink.refuse_tokens = on

    def revoke_quote_tokens(self) -> None:
        """Expire every token issued so far; a freshly fetched one works again."""
        self.quote_tokens.clear()

    def omit_event_fields(self, on: bool = True) -> None:
        self.dxlink.omit_event_fields = on

    # positions --------------------------------------------------------------

    def open_position(self, contract: SimContract) -> None:
        self.market.add_contract(contract)

    def close_position(self, key: ContractKey) -> None:
        self.market.remove_contract(key)

    def execute(
        self, contract: SimContract, action: str, quantity: Decimal, price: Decimal
    ) -> dict[str, Any]:
        """A fill (`action` 'Buy to Open', 'Sell to Close', ...): a "Trade" transaction
        the transactions endpoint lists from now on. Returns its body."""
        now = datetime.now(UTC)
        buy = action.startswith("Buy")
        value = quantity * price * contract.multiplier
        body = {
            "id": 250000000 + len(self.transactions) + 1,
            "account-number": self.account,
            "symbol": occ_symbol(contract.key),
            "instrument-type": "Equity Option",
            "underlying-symbol": contract.underlying,
            "transaction-type": "Trade",
            "transaction-sub-type": action,
            "description": f"{'Bought' if buy else 'Sold'} {quantity} {contract.key} @ {price}",
            "action": action,
            "quantity": str(quantity),
            "price": str(price),
            "executed-at": now.isoformat(timespec="milliseconds"),
            "transaction-date": now.date().isoformat(),
            "value": str(value),
            "value-effect": "Debit" if buy else "Credit",
            "net-value": str(value + Decimal("1.14")) if buy else str(value - Decimal("1.14")),
            "net-value-effect": "Debit" if buy else "Credit",
            "commission": "1.0",
            "commission-effect": "Debit",
            "clearing-fees": "0.1",
            "clearing-fees-effect": "Debit",
            "regulatory-fees": "0.04",
            "regulatory-fees-effect": "Debit",
            "is-estimated-fee": True,
            "exchange": "CBOE",
            "order-id": 400000 + len(self.transactions) + 1,
            "leg-count": 1,
        }
        self.transactions.append(body)
        return body

    def transactions_body(self, kind: str | None, per_page: int, page: int) -> dict[str, Any]:
        items = [t for t in reversed(self.transactions) if kind in (None, t["transaction-type"])]
        pages = max(1, -(-len(items) // per_page))
        return {
            "data": {"items": items[page * per_page : (page + 1) * per_page]},
            "pagination": {
                "per-page": per_page,
                "page-offset": page,
                "item-offset": page * per_page,
                "total-items": len(items),
                "total-pages": pages,
            },
        }

    # REST bodies ------------------------------------------------------------

    def issue_access_token(self) -> str:
        token = secrets.token_urlsafe(24)
        self.access_tokens.add(token)
        return token

    def issue_quote_token(self) -> str:
        self.quote_token_requests += 1
        token = secrets.token_urlsafe(24)
        self.quote_tokens.add(token)
        return token

    def account_body(self) -> dict[str, Any]:
        return {
            "account-number": self.account,
            "opened-at": _CREATED,
            "nickname": "sim",
            "account-type-name": "Individual",
            "is-closed": False,
            "day-trader-status": False,
            "is-firm-error": False,
            "is-firm-proprietary": False,
            "is-futures-approved": True,
            "is-test-drive": False,
            "margin-or-cash": "Margin",
            "is-foreign": False,
            "created-at": _CREATED,
        }

    def positions_body(self) -> list[dict[str, Any]]:
        items = [_held(self.account, c) for c in self.market.contracts]
        return items + [dict(p, **{"account-number": self.account}) for p in self.extra_positions]

    def option_body(self, occ: str) -> dict[str, Any] | None:
        for contract in self.market.contracts:
            if not contract.key.future and occ_symbol(contract.key) == occ:
                return _option(contract)
        return None

    def future_option_body(self, symbol: str) -> dict[str, Any] | None:
        """`GET /instruments/future-options/{symbol}` of a held futures option."""
        for contract in self.market.contracts:
            if contract.key.future and tastytrade_future_option(contract.key) == symbol:
                return _future_option(contract)
        return None

    def future_body(self, symbol: str) -> dict[str, Any] | None:
        """`GET /instruments/futures?symbol[]=` item of a future the book has options on
        ('/ESZ6' or 'ESZ6', as the API accepts both)."""
        for contract in self.market.contracts:
            if contract.key.future and tastytrade_future(contract.underlying) in (
                symbol,
                "/" + symbol,
            ):
                return _future(contract)
        return None


def _position(
    account: str,
    symbol: str,
    kind: str,
    underlying: str,
    quantity: Decimal,
    multiplier: Decimal,
    expires: date | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "account-number": account,
        "symbol": symbol,
        "instrument-type": kind,
        "underlying-symbol": underlying,
        "quantity": str(abs(quantity)),
        "quantity-direction": "Short" if quantity < 0 else "Long" if quantity else "Zero",
        "close-price": "1.0",
        "average-open-price": "1.0",
        "multiplier": str(multiplier),
        "cost-effect": "Debit",
        "is-suppressed": False,
        "is-frozen": False,
        "realized-day-gain": "0.0",
        "realized-day-gain-effect": "None",
        "realized-today": "0.0",
        "realized-today-effect": "None",
        "created-at": _CREATED,
        "updated-at": _CREATED,
    }
    if expires is not None:
        body["expires-at"] = f"{expires.isoformat()}T20:15:00.000+00:00"
    return body


def _held(account: str, contract: SimContract) -> dict[str, Any]:
    key = contract.key
    if key.future:  # symbol and underlying as Tastytrade writes them: './ESZ6 EW3Z6 ...'
        symbol, kind = tastytrade_future_option(key), "Future Option"
        underlying = tastytrade_future(contract.underlying)
    else:
        symbol, kind, underlying = occ_symbol(key), "Equity Option", contract.underlying
    multiplier, quantity = contract.multiplier, contract.quantity
    return _position(account, symbol, kind, underlying, quantity, multiplier, key.expiration)


def _option(contract: SimContract) -> dict[str, Any]:
    key = contract.key
    days = (key.expiration - datetime.now(UTC).date()).days
    return {
        "instrument-type": "Equity Option",
        "symbol": occ_symbol(key),
        "active": True,
        "strike-price": str(key.strike),
        "root-symbol": key.root,
        "underlying-symbol": contract.underlying,
        "expiration-date": key.expiration.isoformat(),
        "exercise-style": "American",
        "shares-per-contract": int(contract.multiplier),
        "option-type": key.right.value,
        "option-chain-type": "Standard",
        "expiration-type": "Regular",
        "settlement-type": "PM",
        "stops-trading-at": f"{key.expiration.isoformat()}T20:00:00.000+00:00",
        "market-time-instrument-collection": "Equity Option",
        "days-to-expiration": days,
        "is-closing-only": False,
        "streamer-symbol": dxfeed_option(contract),
    }


# The futures option and future bodies follow real ones, every field the SDK's
# FutureOption / Future models require included: tasty-go's futures_test.go
# (futureOptionsResp, futuresResp) and option_chains_test.go (github.com/laustindasauce/
# tasty-go), QuantConnect Lean.Brokerages.Tastytrade PR 12 (a GC option). The instrument's
# `multiplier` is "1.0" there; the contract size is `notional-value` / `display-factor`
# (ES: 0.5 / 0.01 = 50), and positions carry it as `multiplier` (a live ZN position: 1000).
_DISPLAY_FACTOR = Decimal("0.01")
_MARKET_SECTOR = {"ES": "Equity Index", "CL": "Energy", "ZN": "Interest Rate"}


def _future_option(contract: SimContract) -> dict[str, Any]:
    key = contract.key
    product = key.future[:-3]
    symbol = tastytrade_future_option(key)
    code = symbol[7:12].rstrip()
    stops = f"{key.expiration.isoformat()}T20:00:00.000+00:00"
    days = (key.expiration - datetime.now(UTC).date()).days
    return {
        "symbol": symbol,
        "underlying-symbol": tastytrade_future(contract.underlying),
        "product-code": product,
        "expiration-date": key.expiration.isoformat(),
        "root-symbol": f"/{product}",
        "option-root-symbol": key.root,
        "strike-price": f"{key.strike:f}",
        "exchange": "CME",
        "exchange-symbol": f"{code} {key.right.value}{symbol[20:]}",
        "streamer-symbol": dxfeed_future_option(key, contract.exchange),
        "option-type": key.right.value,
        "exercise-style": "American",
        "is-vanilla": True,
        "is-primary-deliverable": True,
        "future-price-ratio": "1.0",
        "multiplier": "1.0",
        "underlying-count": "1.0",
        "is-confirmed": True,
        "notional-value": str(contract.multiplier * _DISPLAY_FACTOR),
        "display-factor": str(_DISPLAY_FACTOR),
        "security-exchange": "2",
        "sx-id": "0",
        "settlement-type": "Future",
        "strike-factor": "1.0",
        "maturity-date": key.expiration.isoformat(),
        "is-exercisable-weekly": True,
        "last-trade-time": "0",
        "days-to-expiration": days,
        "is-closing-only": False,
        "active": True,
        "stops-trading-at": stops,
        "expires-at": stops,
        "future-option-product": {
            "root-symbol": key.root,
            "cash-settled": False,
            "code": key.root,
            "legacy-code": key.root,
            "clearport-code": key.root,
            "clearing-code": key.root,
            "clearing-exchange-code": "9C",
            "clearing-price-multiplier": "1.0",
            "display-factor": str(_DISPLAY_FACTOR),
            "exchange": "CME",
            "product-type": "Physical",
            "expiration-type": "Weekly",
            "settlement-delay-days": 0,
            "is-rollover": True,
            "market-sector": _MARKET_SECTOR.get(product, "Equity Index"),
        },
    }


def _future(contract: SimContract) -> dict[str, Any]:
    future, exchange = contract.underlying, contract.exchange
    product = future[:-3]
    last = (contract.key.expiration + timedelta(days=21)).isoformat()
    stops = f"{last}T13:30:00.000+00:00"
    return {
        "symbol": tastytrade_future(future),
        "product-code": product,
        "contract-size": str(contract.multiplier),
        "tick-size": "0.25",
        "notional-multiplier": str(contract.multiplier),
        "main-fraction": "0.0",
        "sub-fraction": "0.0",
        "display-factor": str(_DISPLAY_FACTOR),
        "last-trade-date": last,
        "expiration-date": last,
        "closing-only-date": last,
        "active": True,
        "active-month": True,
        "next-active-month": False,
        "is-closing-only": False,
        "stops-trading-at": stops,
        "expires-at": stops,
        "product-group": f"{exchange}_{product}",
        "exchange": exchange,
        "streamer-exchange-code": dxfeed_future(future, exchange).rsplit(":", 1)[1],
        "streamer-symbol": dxfeed_future(future, exchange),
        "back-month-first-calendar-symbol": True,
        "is-tradeable": True,
        "instrument-type": "Future",
    }


def _default_extras() -> list[dict[str, Any]]:
    return [_position("", "AAPL", "Equity", "AAPL", Decimal(100), Decimal(1), None)]


def _error(status: int, code: str, message: str) -> tuple[dict[str, Any], int]:
    return {"error": {"code": code, "message": message}}, status


def create_app(sim: TastytradeSim) -> QuartTrio:
    app = QuartTrio("greeksd-tastytrade-sim")

    @app.before_request
    async def require_bearer() -> Any:
        if request.path == "/oauth/token" or request.path.startswith("/sim/"):
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in sim.access_tokens:
            return _error(401, "unauthorized", "access token missing, invalid or expired")
        return None

    @app.post("/oauth/token")
    async def oauth_token() -> Any:
        sim.oauth_requests += 1
        body = await request.get_json(force=True, silent=True) or {}
        if body.get("grant_type") != "refresh_token":
            return _error(400, "unsupported_grant_type", "only refresh_token is supported")
        if (
            body.get("client_secret") != sim.secret
            or body.get("refresh_token") != sim.refresh_token
        ):
            return _error(401, "invalid_grant", "Grant revoked")
        token = sim.issue_access_token()
        return {"access_token": token, "expires_in": 900, "token_type": "Bearer"}

    @app.get("/customers/me/accounts")
    async def accounts() -> Any:
        item = {"account": sim.account_body(), "authority-level": "owner"}
        return {"data": {"items": [item]}, "context": "/customers/me/accounts"}

    @app.get("/customers/me/accounts/<number>")
    async def account(number: str) -> Any:
        if number != sim.account:
            return _error(404, "record_not_found", f"account {number} not found")
        return {"data": sim.account_body()}

    @app.get("/accounts/<number>/positions")
    async def positions(number: str) -> Any:
        if number != sim.account:
            return _error(404, "record_not_found", f"account {number} not found")
        return {"data": {"items": sim.positions_body()}}

    @app.get("/accounts/<number>/transactions")
    async def transactions(number: str) -> Any:
        sim.transaction_requests += 1
        if number != sim.account:
            return _error(404, "record_not_found", f"account {number} not found")
        args = request.args
        try:
            per_page = max(1, min(int(args.get("per-page", 250)), 2000))
            page = max(0, int(args.get("page-offset", 0)))
        except ValueError:
            return _error(400, "bad_request", "per-page and page-offset must be integers")
        return sim.transactions_body(args.get("type"), per_page, page)

    @app.get("/instruments/equity-options")
    async def options() -> Any:
        symbols = request.args.getlist("symbol[]")
        items = [body for s in symbols if (body := sim.option_body(s)) is not None]
        return {"data": {"items": items}}

    @app.get("/instruments/equity-options/<path:symbol>")
    async def option(symbol: str) -> Any:
        body = sim.option_body(symbol)
        return {"data": body} if body else _error(404, "record_not_found", symbol)

    @app.get("/instruments/future-options")
    async def future_options() -> Any:
        symbols = request.args.getlist("symbol[]")
        items = [body for s in symbols if (body := sim.future_option_body(s)) is not None]
        return {"data": {"items": items}}

    @app.get("/instruments/future-options/<path:symbol>")
    async def future_option(symbol: str) -> Any:
        requests = sim.future_option_requests
        requests[symbol] = requests.get(symbol, 0) + 1
        body = sim.future_option_body(symbol)
        return {"data": body} if body else _error(404, "record_not_found", symbol)

    @app.get("/instruments/futures")
    async def futures() -> Any:
        symbols = request.args.getlist("symbol[]")
        items = [body for s in symbols if (body := sim.future_body(s)) is not None]
        return {
            "data": {"items": items},
            "pagination": {"per-page": 250, "page-offset": 0, "total-pages": 1},
        }

    @app.get("/api-quote-tokens")
    async def quote_tokens() -> Any:
        token = sim.issue_quote_token()
        return {"data": {"token": token, "dxlink-url": sim.dxlink_url, "level": "api"}}

    @app.post("/sim/faults/<name>")
    async def fault(name: str) -> Any:
        on = request.args.get("on", "1") != "0"
        dxlink = sim.dxlink
        actions: dict[str, Any] = {
            "drop": sim.drop,
            "malformed": sim.send_malformed,
            "error": sim.send_error,
            "error-unauthorized": lambda: dxlink.send_error("UNAUTHORIZED", "not entitled"),
            "reorder-greeks": lambda: dxlink.reorder_fields("Greeks"),
        }

        switches: dict[str, Any] = {
            "stall": sim.stall,
            "refuse-token": sim.refuse_tokens,
            "omit-event-fields": sim.omit_event_fields,
            "auth-state-first": lambda on: setattr(dxlink, "auth_state_first", on),
            "integer-timeouts": lambda on: setattr(dxlink, "integer_timeouts", on),
            "open-access": lambda on: setattr(dxlink, "open_access", on),
            "refuse-channels": lambda on: setattr(
                dxlink, "channel_refusal", "error" if on else None
            ),
            "never-open-channels": lambda on: setattr(
                dxlink, "channel_refusal", "silent" if on else None
            ),
            "withhold-greeks": lambda on: setattr(
                dxlink,
                "greeks_withheld",
                {str(c.key) for c in dxlink.market.contracts} if on else set(),
            ),
        }
        if name in actions:
            await actions[name]()
        elif name in switches:
            switches[name](on)
        elif name == "revoke-tokens":
            sim.revoke_quote_tokens()
        else:
            return _error(404, "unknown_fault", f"faults: {sorted([*actions, *switches])}")
        return {"data": {"fault": name, "on": on}}

    @app.post("/sim/positions")
    async def open_position() -> Any:
        body = await request.get_json(force=True, silent=True) or {}
        try:
            key = ContractKey.parse(str(body["contract_key"]))
            quantity = Decimal(str(body.get("quantity", 1)))
        except (KeyError, ValueError, ArithmeticError) as exc:
            return _error(400, "bad_request", f"need contract_key and quantity: {exc}")
        underlying = str(body.get("underlying", key.root))
        sim.open_position(SimContract(key, underlying, Decimal(100), quantity))
        return {"data": {"opened": str(key)}}

    @app.delete("/sim/positions/<path:contract_key>")
    async def close_position(contract_key: str) -> Any:
        try:
            key = ContractKey.parse(contract_key)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        sim.close_position(key)
        return {"data": {"closed": str(key)}}

    return app


@asynccontextmanager
async def open_tastytrade_sim(
    port: int = 0,
    *,
    contracts: Sequence[SimContract] | None = None,
    tick_interval: float = 0.05,
    events_per_frame: int = 3,
    keepalive_timeout: float = 60.0,
    nan_rho_rate: float = 0.1,
    ws_port: int = 0,
    host: str = "127.0.0.1",
    seed: int = 7,
    futures_options: int = 0,
) -> AsyncIterator[TastytradeSim]:
    """Run the REST endpoints and the DXLink server on real sockets for the block.
    `futures_options`: that many futures options (`futures_option_contracts`) join the
    book, held as Tastytrade holds them ('Future Option' positions, their instruments,
    their futures' quotes on DXLink); any futures option in `contracts` is too."""
    today = datetime.now(UTC).date()
    book = list(contracts) if contracts is not None else default_contracts(today)
    market = SyntheticMarket(
        book + futures_option_contracts(today, futures_options), as_of=today, seed=seed
    )
    sim_ref: list[TastytradeSim] = []
    dxlink = DxLinkServer(
        market,
        token_valid=lambda token: token in sim_ref[0].quote_tokens,
        tick_interval=tick_interval,
        events_per_frame=events_per_frame,
        keepalive_timeout=keepalive_timeout,
        nan_rho_rate=nan_rho_rate,
        seed=seed,
    )
    sim = TastytradeSim(market, dxlink, extra_positions=_default_extras())
    sim_ref.append(sim)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.keep_alive_timeout = 3600.0  # idle REST connections outlive MockClock jumps
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    async with trio.open_nursery() as nursery:
        await nursery.start(dxlink.serve, host, ws_port)
        binds = await nursery.start(serve, create_app(sim), config)
        sim.api_url = binds[0]
        log.info("sim_tastytrade_started", api_url=sim.api_url, dxlink_url=sim.dxlink_url)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()


async def run_tastytrade_sim(
    port: int, *, ws_port: int = 0, tick_interval: float = 0.25, futures_options: int = 0
) -> None:
    """`greeksd sim tastytrade --port N`: serve until cancelled (Ctrl-C)."""
    async with open_tastytrade_sim(
        port, ws_port=ws_port, tick_interval=tick_interval, futures_options=futures_options
    ) as sim:
        print(
            f"Tastytrade simulator: GREEKSD_TT_API_URL={sim.api_url} "
            f"GREEKSD_TT_SECRET={sim.secret} GREEKSD_TT_REFRESH={sim.refresh_token}\n"
            f"DXLink at {sim.dxlink_url}; faults: POST {sim.api_url}/sim/faults/<name>",
            flush=True,
        )
        await trio.sleep_forever()
