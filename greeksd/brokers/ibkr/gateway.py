"""REST client for the Client Portal Gateway (HTTPS, httpx under trio).

IBKR paces REST calls (10/s overall, less on some endpoints) and answers a burst with 429
and a penalty box of about 10 minutes, so every request takes a slot from one
`RestPacer` (greeksd/brokers/ibkr/pacing.py, one table of limits), and a 429 stops every
request until the penalty is over: `PenaltyBox` is raised at once, without asking the
gateway, so nothing hammers it. What each answer means is decided in session.py; each
exception carries that `Failure` as its `kind`.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import trio

from greeksd.brokers.ibkr import pacing, protocol, session
from greeksd.brokers.ibkr.pacing import RestPacer
from greeksd.brokers.ibkr.protocol import OptionPosition, PositionScan
from greeksd.brokers.ibkr.session import Failure, SessionInfo
from greeksd.logs import get_logger

log = get_logger("greeksd.ibkr.gateway")

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class GatewayError(Exception):
    """The gateway answered badly or not at all; the message says which call."""

    kind = Failure.ERROR


class NotAuthenticated(GatewayError):
    """No usable brokerage session: the user must log in to the gateway (or it reset
    daily), or another login holds the session. `reason` is the status text."""

    kind = Failure.NOT_AUTHENTICATED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotLoggedIn(NotAuthenticated):
    """/tickle (or /iserver/auth/status) answered 401: the gateway itself is logged out;
    the reason names the URL to log in at."""

    kind = Failure.NOT_LOGGED_IN


class NoBridge(NotAuthenticated):
    """/iserver/* answered 400 "no bridge": logged-in gateway, no brokerage session."""

    kind = Failure.NO_BRIDGE


class PenaltyBox(GatewayError):
    """A 429, or a request refused locally because the penalty of an earlier 429 is not
    over: the message says until when."""

    kind = Failure.PENALTY_BOX


class GatewayUnavailable(GatewayError):
    """Could not reach the gateway (refused, TLS failure, timeout)."""

    kind = Failure.UNAVAILABLE


_FAILURES: dict[Failure, type[GatewayError]] = {
    Failure.NOT_LOGGED_IN: NotLoggedIn,
    Failure.NOT_AUTHENTICATED: NotAuthenticated,
    Failure.NO_BRIDGE: NoBridge,
    Failure.ERROR: GatewayError,
}


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
        min_interval: float = pacing.GLOBAL_INTERVAL_S,
        timeout: float = 10.0,
        penalty_s: float = pacing.PENALTY_S,
    ) -> None:
        """`min_interval`: the spacing of IBKR's global limit (0.1 s = 10/s); the
        per-endpoint spacings keep their ratio to it, so 0 turns pacing off (only for a
        simulator that does not enforce it). `penalty_s`: the penalty box after a 429
        that carries no Retry-After."""
        self.url = url.rstrip("/")
        self.ssl_context = client_ssl_context(url, ca_file=ca_file, verify_tls=verify_tls)
        self._timeout = timeout
        self._pacer = RestPacer(
            scale=min_interval / pacing.GLOBAL_INTERVAL_S, default_penalty_s=penalty_s
        )
        self._client: httpx.AsyncClient | None = None
        self._futures: dict[int, dict[str, Any]] = {}

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

    def penalty_remaining(self) -> float:
        """Seconds until the gateway may be asked again (0 outside a penalty box)."""
        return self._pacer.penalty_remaining(trio.current_time())

    @property
    def penalty_until(self) -> datetime | None:
        """Wall-clock end of the current or last penalty box."""
        return self._pacer.penalty_until_wall

    def _refuse_in_penalty(self) -> None:
        if self._pacer.penalty_remaining(trio.current_time()) > 0:
            raise PenaltyBox(self._pacer.penalty_reason())

    async def _paced(self, path: str) -> None:
        self._refuse_in_penalty()
        while (delay := self._pacer.acquire(path, trio.current_time())) > 0:
            await trio.sleep(delay)
            self._refuse_in_penalty()  # a 429 may have come while this call waited

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON body of one call. 401 => NotAuthenticated (NotLoggedIn on /tickle), 400
        "no bridge" => NoBridge, 429 => PenaltyBox and no request until it is over."""
        assert self._client is not None, "use `async with GatewayClient(...)`"
        await self._paced(path)
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GatewayUnavailable(f"{method} {path}: {_root_cause(exc)}") from exc
        try:
            body = response.json()
        except ValueError:
            body = _NOT_JSON
        failure = session.rest_failure(
            method, path, response.status_code, body, response.text, self.url
        )
        if failure is None:
            if body is _NOT_JSON:
                raise GatewayError(f"{method} {path}: response is not JSON")
            return body
        kind, reason = failure
        if kind is Failure.PENALTY_BOX:
            seconds = self._pacer.penalize(
                trio.current_time(), datetime.now(UTC), _retry_after(response)
            )
            reason = self._pacer.penalty_reason()
            log.warning("ibkr_penalty_box", call=f"{method} {path}", seconds=seconds, until=reason)
            raise PenaltyBox(reason)
        raise _FAILURES[kind](reason)

    async def auth_status(self) -> SessionInfo:
        body = _object(await self.request("POST", "/iserver/auth/status"), "auth status")
        return SessionInfo(
            "",
            body.get("authenticated") is True,
            body.get("competing") is True,
            str(body.get("message") or body.get("fail") or body.get("error") or ""),
        )

    async def tickle(self) -> SessionInfo:
        """Keeps the session alive; its `session` token logs the websocket in."""
        body = _object(await self.request("POST", "/tickle"), "tickle")
        return SessionInfo(*session.tickle_session(body))

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

    async def contract_info(self, conid: int) -> dict[str, Any]:
        """/iserver/contract/{conid}/info: a future's `local_symbol` ('ESZ5') and
        `contract_month`, which /trsrv/secdef does not give."""
        path = f"/iserver/contract/{conid}/info"
        return _object(await self.request("GET", path), "contract info")

    async def futures(self, conids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The contract info of the futures that held futures options are on. A future's
        code never changes, so each is asked once per client; one the gateway cannot
        describe is left out (its options are then unsupported, with the reason)."""
        for conid in sorted(set(conids) - self._futures.keys()):
            try:
                self._futures[conid] = await self.contract_info(conid)
            except GatewayError as exc:
                if exc.kind is not Failure.ERROR:  # the session or the penalty box: theirs
                    raise
                log.warning("ibkr_future_unknown", conid=conid, error=str(exc))
        return self._futures

    async def option_positions(self) -> PositionScan:
        """All option and futures option positions of every account, gaps filled from
        secdef (and a futures option's future from its contract info), plus
        human-readable reasons for positions that could not be used."""
        options_raw: list[tuple[dict[str, Any], str]] = []
        fops_raw: list[tuple[dict[str, Any], str]] = []
        for account in await self.portfolio_accounts():
            for position in await self.positions(account):
                if protocol.is_option(position):
                    options_raw.append((position, account))
                elif protocol.is_future_option(position):
                    fops_raw.append((position, account))
        lacking = [int(p["conid"]) for p, _ in options_raw if protocol.missing_option_fields(p)]
        lacking += [
            int(p["conid"]) for p, _ in fops_raw if protocol.missing_future_option_fields(p)
        ]
        details = await self.secdef(lacking) if lacking else {}
        options: list[OptionPosition] = []
        problems: list[str] = []
        unsupported: list[str] = []
        for position, account in options_raw:
            merged = protocol.overlay(details.get(int(position["conid"]), {}), position)
            try:
                options.append(protocol.parse_option_position(merged, account))
            except ValueError as exc:
                problems.append(str(exc))
        fops = [
            (protocol.overlay(details.get(int(p["conid"]), {}), p), account)
            for p, account in fops_raw
        ]
        und_conids = [c for p, _ in fops if (c := protocol.und_conid(p)) is not None]
        futures = await self.futures(und_conids) if und_conids else {}
        for merged, account in fops:
            try:
                options.append(protocol.parse_future_option_position(merged, account, futures))
            except protocol.UnsupportedPosition as exc:
                unsupported.append(str(exc))
            except ValueError as exc:
                problems.append(str(exc))
        return PositionScan(options, problems, unsupported)


_NOT_JSON = object()


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
