"""REST client for the Client Portal Gateway (HTTPS, httpx under trio).

The gateway allows about 10 requests/s and can put a bursting client in a 10-minute
penalty box, so every request goes through one pacer and a 429 backs off.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr import protocol
from greeksd.brokers.ibkr.protocol import OptionPosition
from greeksd.logs import get_logger

log = get_logger("greeksd.ibkr.gateway")

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class GatewayError(Exception):
    """The gateway answered badly or not at all; the message says which call."""


class NotAuthenticated(GatewayError):
    """No brokerage session: the user must log in to the gateway (or it reset daily)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RateLimited(GatewayError):
    """Still 429 after backing off: the gateway's pacing limit (penalty box)."""


class GatewayUnavailable(GatewayError):
    """Could not reach the gateway (refused, TLS failure, timeout)."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What `/tickle` and `/iserver/auth/status` report."""

    session: str
    authenticated: bool
    competing: bool
    message: str

    @property
    def problem(self) -> str | None:
        """The degraded reason, or None when market data can flow."""
        if self.competing:
            return "competing session"
        if not self.authenticated:
            return "not authenticated" + (f": {self.message}" if self.message else "")
        return None


def client_ssl_context(url: str, *, ca_file: Path | None, verify_tls: bool) -> ssl.SSLContext:
    """The gateway's certificate is self-signed: accepted on localhost unless `verify_tls`
    or a pinned `ca_file`; any other host is verified."""
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    context = ssl.create_default_context()
    if not verify_tls and (urlsplit(url).hostname or "") in LOCAL_HOSTS:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class GatewayClient:
    """`async with GatewayClient(url) as gw:` — one paced HTTPS connection pool."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path | None = None,
        verify_tls: bool = False,
        min_interval: float = 0.1,
        timeout: float = 10.0,
        retries_429: int = 4,
        backoff_429_s: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.ssl_context = client_ssl_context(url, ca_file=ca_file, verify_tls=verify_tls)
        self._min_interval = min_interval
        self._timeout = timeout
        self._retries_429 = retries_429
        self._backoff_429_s = backoff_429_s
        self._pace = trio.Lock()
        self._next_slot = 0.0
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            base_url=self.url + "/v1/api",
            verify=self.ssl_context,
            timeout=self._timeout,
            headers={"User-Agent": "greeksd"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            with trio.CancelScope(shield=True):
                await self._client.aclose()
            self._client = None

    @property
    def ws_url(self) -> str:
        return "wss://" + self.url.split("://", 1)[1] + "/v1/api/ws"

    async def _paced(self) -> None:
        async with self._pace:
            now = trio.current_time()
            if now < self._next_slot:
                await trio.sleep(self._next_slot - now)
            self._next_slot = max(now, self._next_slot) + self._min_interval

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON body of one call; 401 => NotAuthenticated, 429 => back off and retry."""
        assert self._client is not None, "use `async with GatewayClient(...)`"
        backoff = Backoff(initial=self._backoff_429_s, maximum=30.0)
        for _attempt in range(self._retries_429 + 1):
            await self._paced()
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise GatewayUnavailable(f"{method} {path}: {_root_cause(exc)}") from exc
            if response.status_code == 429:
                delay = _retry_after(response) or backoff.next_delay()
                log.warning("ibkr_rate_limited", path=path, retry_in_s=round(delay, 2))
                await trio.sleep(delay)
                continue
            if response.status_code == 401:
                raise NotAuthenticated(f"{method} {path}: 401 not authenticated")
            if response.status_code >= 400:
                raise GatewayError(
                    f"{method} {path}: HTTP {response.status_code} {response.text[:200]}"
                )
            try:
                return response.json()
            except ValueError as exc:
                raise GatewayError(f"{method} {path}: response is not JSON") from exc
        raise RateLimited(f"{method} {path}: still 429 after {self._retries_429} retries")

    async def auth_status(self) -> SessionInfo:
        body = _object(await self.request("POST", "/iserver/auth/status"), "auth status")
        return SessionInfo(
            "",
            bool(body.get("authenticated")),
            bool(body.get("competing")),
            str(body.get("message") or body.get("fail") or ""),
        )

    async def tickle(self) -> SessionInfo:
        """Keeps the session alive; its `session` token logs the websocket in."""
        body = _object(await self.request("POST", "/tickle"), "tickle")
        auth = (body.get("iserver") or {}).get("authStatus") or {}
        return SessionInfo(
            str(body.get("session") or ""),
            bool(auth.get("authenticated")),
            bool(auth.get("competing")),
            str(auth.get("message") or ""),
        )

    async def iserver_accounts(self) -> list[str]:
        """Must run once per session before market data flows."""
        body = _object(await self.request("GET", "/iserver/accounts"), "iserver accounts")
        return [str(a) for a in body.get("accounts") or ()]

    async def portfolio_accounts(self) -> list[str]:
        body = await self.request("GET", "/portfolio/accounts")
        if not isinstance(body, list):
            raise GatewayError("/portfolio/accounts: expected a list")
        return [str(a.get("accountId") or a.get("id")) for a in body if isinstance(a, dict)]

    async def positions(self, account_id: str) -> list[dict[str, Any]]:
        """Every page (100 per page) until an empty one."""
        result: list[dict[str, Any]] = []
        for page in range(1000):
            body = await self.request("GET", f"/portfolio/{account_id}/positions/{page}")
            if not isinstance(body, list):
                raise GatewayError(f"positions page {page}: expected a list")
            if not body:
                return result
            result.extend(p for p in body if isinstance(p, dict))
        raise GatewayError("positions: more than 1000 pages")

    async def secdef(self, conids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = ",".join(str(c) for c in conids)
        body = _object(await self.request("GET", "/trsrv/secdef", params={"conids": ids}), "secdef")
        return {int(d["conid"]): d for d in body.get("secdef") or () if "conid" in d}

    async def snapshot(self, conids: Sequence[int], fields: Sequence[str]) -> list[dict[str, Any]]:
        """Preflight: the first call per conid returns only conid/conidEx."""
        params = {"conids": ",".join(map(str, conids)), "fields": ",".join(fields)}
        body = await self.request("GET", "/iserver/marketdata/snapshot", params=params)
        return [row for row in body if isinstance(row, dict)] if isinstance(body, list) else []

    async def trades(self) -> list[dict[str, Any]]:
        """Recent executions (the gateway keeps the current day and a few before): the
        backfill for whatever executed while the websocket was down."""
        body = await self.request("GET", "/iserver/account/trades")
        if not isinstance(body, list):
            raise GatewayError("/iserver/account/trades: expected a list")
        return [e for e in body if isinstance(e, dict)]

    async def option_positions(self) -> PositionScan:
        """All option positions of every account, gaps filled from secdef, plus
        human-readable reasons for positions that could not be used."""
        raw: list[tuple[dict[str, Any], str]] = []
        future_options = 0
        for account in await self.portfolio_accounts():
            for position in await self.positions(account):
                if protocol.is_option(position):
                    raw.append((position, account))
                elif protocol.is_future_option(position):
                    future_options += 1
        lacking = [int(p["conid"]) for p, _ in raw if protocol.missing_option_fields(p)]
        details = await self.secdef(lacking) if lacking else {}
        options: list[OptionPosition] = []
        problems: list[str] = []
        for position, account in raw:
            merged = {
                **details.get(int(position["conid"]), {}),
                **{k: v for k, v in position.items() if v not in (None, "")},
            }
            try:
                options.append(protocol.parse_option_position(merged, account))
            except ValueError as exc:
                problems.append(str(exc))
        return PositionScan(options, problems, future_options)


@dataclass(frozen=True, slots=True)
class PositionScan:
    """Option positions greeksd records, and what it held but cannot record."""

    options: list[OptionPosition]
    problems: list[str]
    future_options: int = 0


def _object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError(f"{what}: expected a JSON object")
    return body


def _root_cause(exc: BaseException) -> str:
    """httpx wraps TLS and socket errors; the innermost one says what actually failed."""
    for _ in range(10):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return f"{type(exc).__name__}: {exc}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
