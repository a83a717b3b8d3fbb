"""Tastytrade REST through the official SDK: OAuth, accounts, option positions (with the
instruments API's streamer symbols of futures options), quote token.

The SDK is the right tool for REST (it tracks the API's models and its OAuth refresh);
its streamer is not, so this module stops at the quote token and hands the DXLink URL
to `stream.py`. It does I/O only: what the answers mean for the link (subscriptions,
trades) is the DXLink `Connection`'s. Errors leave here as two types only:
`TastytradeAuthError` (the refresh token or secret is refused: needs a human) and
`TastytradeApiError` (anything else: retry with backoff).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import httpx2
from pydantic import ValidationError
from tastytrade import Account, Session
from tastytrade.account import CurrentPosition
from tastytrade.instruments import Future, FutureOption
from tastytrade.order import InstrumentType
from tastytrade.utils import TastytradeError

from greeksd.brokers.tastytrade.protocol import (
    FeedSymbols,
    Positions,
    SymbolError,
    Unsupported,
    future_option_feed,
    parse_future_option_symbol,
    parse_occ,
)
from greeksd.logs import get_logger
from greeksd.model import Contract, ContractKey, future_root
from greeksd.redact import register_secret

log = get_logger("greeksd.tastytrade.session")


class TastytradeAuthError(Exception):
    """Tastytrade refused our OAuth credentials; retrying will not help until they change."""


class TastytradeApiError(Exception):
    """A REST call failed for a reason worth retrying (network, 5xx, unexpected body)."""


@dataclass(frozen=True, slots=True)
class QuoteToken:
    token: str = field(repr=False)
    dxlink_url: str


def point_session_at(session: Session, api_url: str) -> None:
    """Send the SDK's REST calls to `api_url` (the simulator) instead of Tastytrade.

    The SDK fixes its base URL in `Session.__init__`; its httpx2 client's `base_url` is
    the one place to change it, and every SDK call uses relative paths.
    """
    session._client.base_url = api_url


async def _refuse_auth_failures(response: httpx2.Response) -> None:
    """Turn a refused credential into our typed error before the SDK flattens it into a
    generic TastytradeError without the status code."""
    oauth = response.request.url.path.endswith("/oauth/token")
    if response.status_code == 401 or (oauth and response.status_code // 100 == 4):
        await response.aread()
        try:
            detail = response.json().get("error", {})
            code = f"{detail.get('code', '')}: {detail.get('message', '')}".strip(": ")
        except (ValueError, AttributeError):
            code = ""
        raise TastytradeAuthError(
            f"Tastytrade refused the OAuth credentials (HTTP {response.status_code}"
            + (f", {code}" if code else "")
            + "): check GREEKSD_TT_SECRET and GREEKSD_TT_REFRESH; a refresh token is"
            " revoked when a new one is generated or the OAuth grant is removed"
        )


class TastytradeApi:
    """What the stream needs from REST, over one SDK session (use `async with`)."""

    def __init__(
        self,
        provider_secret: str | None,
        refresh_token: str | None,
        *,
        account: str | None = None,
        api_url: str | None = None,
    ) -> None:
        self._secret = provider_secret
        self._refresh = refresh_token
        self._account = account
        self._api_url = api_url
        self._session: Session | None = None
        self._reported: set[tuple[str, str]] = set()
        self._options: dict[str, FutureOption] = {}  # by position symbol
        self._futures: dict[str, str] = {}  # future symbol ('/ESZ5') -> its streamer symbol

    @asynccontextmanager
    async def open(self) -> AsyncIterator[TastytradeApi]:
        if not self._secret or not self._refresh:
            raise TastytradeAuthError(
                "Tastytrade needs GREEKSD_TT_SECRET (OAuth provider secret) and "
                "GREEKSD_TT_REFRESH (refresh token)"
            )
        register_secret(self._secret)
        register_secret(self._refresh)
        session = Session(
            self._secret, self._refresh, event_hooks={"response": [_refuse_auth_failures]}
        )
        if self._api_url:
            point_session_at(session, self._api_url)
        async with session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("TastytradeApi used outside `async with api.open()`")
        return self._session

    async def _accounts(self) -> list[Account]:
        if self._account:
            return [await Account.get(self.session, self._account)]
        return await Account.get(self.session)

    async def positions(self) -> Positions:
        """Open option positions of the configured account (or every open account):
        equity/index options from their OCC symbols, futures options from their symbols
        plus the instruments API's streamer symbols (`_future_option_feeds`)."""
        session = self.session
        async with _api_errors("positions"):
            accounts = await self._accounts()
            raw = [p for account in accounts for p in await account.get_positions(session)]
        contracts: list[Contract] = []
        held_futures: list[tuple[CurrentPosition, Contract]] = []
        unparsable = 0
        unsupported: dict[str, int] = {}
        for position in raw:
            kind = position.instrument_type
            if kind not in _OPTIONS:
                continue
            sign = -1 if position.quantity_direction == "Short" else 1
            quantity = position.quantity * sign
            if quantity == 0:
                continue
            try:
                if kind is InstrumentType.FUTURE_OPTION:
                    key = parse_future_option_symbol(position.symbol)
                else:
                    key = parse_occ(position.symbol)
            except SymbolError as exc:
                unparsable += 1
                log.warning("position_symbol_unparsable", symbol=position.symbol, reason=str(exc))
                continue
            contract = Contract(
                key=key,
                underlying=future_root(key.future) if key.future else position.underlying_symbol,
                multiplier=Decimal(position.multiplier),
                quantity=quantity,
                account_id=position.account_number,
            )
            if key.future:
                held_futures.append((position, contract))
            else:
                contracts.append(contract)
        feeds: dict[ContractKey, FeedSymbols] = {}
        if held_futures:
            await self._future_option_feeds(held_futures, contracts, feeds, unsupported)
        return Positions(contracts, unparsable, feeds, unsupported)

    async def _future_option_feeds(
        self,
        held: list[tuple[CurrentPosition, Contract]],
        contracts: list[Contract],
        feeds: dict[ContractKey, FeedSymbols],
        unsupported: dict[str, int],
    ) -> None:
        """Each held futures option's streamer symbol (`GET
        /instruments/future-options/{symbol}`) and its future's (`GET
        /instruments/futures?symbol[]=`), cached for the life of this object: the
        symbols of a listed contract never change. One that cannot be looked up or
        checked is counted by reason, logged once, and tried again on the next refresh."""
        session = self.session
        for position, _ in held:
            symbol = position.symbol
            if symbol not in self._options:
                try:
                    self._options[symbol] = await FutureOption.get(session, symbol)
                except (TastytradeError, httpx2.HTTPError, ValidationError, KeyError) as exc:
                    self._report(symbol, "future option instrument lookup failed", exc)
        wanted = {
            self._options[p.symbol].underlying_symbol for p, _ in held if p.symbol in self._options
        } - self._futures.keys()
        if wanted:
            try:
                for future in await Future.get(session, sorted(wanted)):
                    if future.streamer_symbol:
                        self._futures[future.symbol] = future.streamer_symbol
            except (TastytradeError, httpx2.HTTPError, ValidationError, KeyError) as exc:
                self._report(",".join(sorted(wanted)), "future instrument lookup failed", exc)
        for position, contract in held:
            try:
                feed, exchange = self._feed(position, contract)
            except Unsupported as exc:
                reason = str(exc)
                unsupported[reason] = unsupported.get(reason, 0) + 1
                self._report(position.symbol, reason)
                continue
            contracts.append(replace(contract, exchange=exchange))
            feeds[contract.key] = feed

    def _feed(self, position: CurrentPosition, contract: Contract) -> tuple[FeedSymbols, str]:
        """The checked feed symbols and the exchange of one held futures option (raises
        `Unsupported`)."""
        option = self._options.get(position.symbol)
        if option is None:
            raise Unsupported("future option instrument lookup failed")
        future_streamer = self._futures.get(option.underlying_symbol)
        if future_streamer is None:
            raise Unsupported("future instrument lookup failed")
        feed, exchange = future_option_feed(contract.key, option.streamer_symbol, future_streamer)
        return feed, exchange or option.exchange

    def _report(self, symbol: str, reason: str, exc: Exception | None = None) -> None:
        """Log a position's problem once, not at every refresh."""
        if (symbol, reason) in self._reported:
            return
        self._reported.add((symbol, reason))
        detail = f"{type(exc).__name__}: {str(exc).strip()[:200]}" if exc is not None else ""
        log.warning("position_unsupported", symbol=symbol, reason=reason, detail=detail)

    async def transactions(self) -> list[dict[str, Any]]:
        """The latest `TRADES_PAGE` trade transactions of each account, newest first, as
        the API's JSON (the SDK's validated model, dumped with its dasherized keys):
        polled with every positions refresh, mapped to trades by
        `protocol.transaction_trades`; fills seen before are stored once by the trades
        table's (broker, broker_trade_id) key."""
        session = self.session
        async with _api_errors("transactions"):
            return [
                tx.model_dump(mode="json", by_alias=True)
                for account in await self._accounts()
                for tx in await account.get_history(
                    session, per_page=TRADES_PAGE, page_offset=0, sort="Desc", type="Trade"
                )
            ]

    async def quote_token(self) -> QuoteToken:
        """A fresh DXLink token and URL (tokens live about a day)."""
        async with _api_errors("quote token"):
            data: dict[str, Any] = await self.session._get("/api-quote-tokens")
            token, url = data["token"], data["dxlink-url"]
        if not isinstance(token, str) or not isinstance(url, str):
            raise TastytradeApiError("quote token response lacks token / dxlink-url strings")
        return QuoteToken(token, url)


TRADES_PAGE = 250
_OPTIONS = (InstrumentType.EQUITY_OPTION, InstrumentType.FUTURE_OPTION)


@asynccontextmanager
async def _api_errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except TastytradeAuthError:
        raise
    except (TastytradeError, httpx2.HTTPError, OSError, ValidationError, KeyError) as exc:
        raise TastytradeApiError(
            f"Tastytrade {what} request failed: {type(exc).__name__}: {str(exc).strip()[:300]}"
        ) from exc
