"""`IbkrClient`: IBKR's side of the link runner (greeksd.brokers.link's `BrokerClient`).

REST only, through the paced `GatewayClient`: before each socket `/tickle` (its session
token is the websocket's cookie), `/iserver/accounts` (without it no market data flows)
and the positions; during a link, the calls its `IbkrConnection` asks for. What answers
mean is decided elsewhere (session.py, the Connection); here a failure only becomes a
`LinkDown` (before a socket) or a `CallFailed` of the gateway error's kind (during one).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from greeksd.backoff import Address, url_address
from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.connection import IbkrConnection, IbkrCounters, LinkSettings
from greeksd.brokers.ibkr.gateway import GatewayClient, GatewayError, GatewayUnavailable, PenaltyBox
from greeksd.brokers.ibkr.protocol import PositionScan
from greeksd.brokers.link import Call, CallFailed, LinkDown, LinkTarget
from greeksd.coverage import Coverage
from greeksd.model import ContractKey, StreamStatus
from greeksd.redact import register_secret


def ibkr_counters(status: StreamStatus) -> IbkrCounters:
    """The status's `IbkrCounters`, made on first use: they live as long as the status
    (across links and restarts), as the status's other counts do."""
    if not isinstance(status.counters, IbkrCounters):
        status.counters = IbkrCounters()
    return status.counters


class IbkrClient:
    """`async with IbkrClient(GatewayClient(url), …) as client:` — one run of the IBKR
    stream's REST (entering it opens the gateway client's connection pool)."""

    def __init__(
        self,
        gw: GatewayClient,
        settings: LinkSettings | None = None,
        option_keys: dict[int, ContractKey] | None = None,
    ) -> None:
        self.gw = gw
        self.settings = settings or LinkSettings()
        self.option_keys = {} if option_keys is None else option_keys

    async def __aenter__(self) -> Self:
        await self.gw.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.gw.__aexit__(exc_type, exc, tb)

    def address(self) -> Address:
        return url_address(self.gw.url)

    async def open_link(self, status: StreamStatus, fresh_credentials: bool) -> LinkTarget:
        """The session token, /iserver/accounts and the positions, then the socket's
        target; every session is fresh, so `fresh_credentials` changes nothing."""
        counters, gw = ibkr_counters(status), self.gw
        try:
            info = await gw.tickle()
            if info.problem:
                raise LinkDown(info.problem)
            if not info.session:
                raise LinkDown("/tickle returned no session token")
            register_secret(info.session)
            await gw.iserver_accounts()
            scan = await gw.option_positions()
        except PenaltyBox as exc:  # not one request before it is over
            counters.penalty_box_until = gw.penalty_until
            raise LinkDown(str(exc), wait_s=gw.penalty_remaining()) from exc
        except GatewayError as exc:  # unreachable: probe it; answered: back off
            address = self.address() if isinstance(exc, GatewayUnavailable) else None
            raise LinkDown(str(exc), address=address) from exc
        connection = self.connection(info.session, scan, counters, status.coverage)
        return self.target(info.session, connection)

    def connection(
        self,
        session: str,
        scan: PositionScan,
        counters: IbkrCounters,
        coverage: Coverage | None = None,
    ) -> IbkrConnection:
        return IbkrConnection(
            session,
            scan,
            settings=self.settings,
            option_keys=self.option_keys,
            counters=counters,
            coverage=coverage,
        )

    def target(self, session: str, connection: IbkrConnection) -> LinkTarget:
        """The websocket, logged in by the `api={"session": …}` cookie on the upgrade;
        the recording's link record keeps `max_lines`, which replay plans lines with."""
        return LinkTarget(
            self.gw.ws_url,
            connection,
            headers=[(b"Cookie", p.session_cookie(session).encode())],
            ssl_context=self.gw.ssl_context,
            record={"max_lines": self.settings.max_lines},
        )

    async def call(self, call: Call) -> Any:
        """One call an `IbkrConnection` asked for (its names: connection.TICKLE, …)."""
        gw = self.gw
        try:
            if call.name == "tickle":
                return await gw.tickle()
            if call.name == "positions":
                return await gw.option_positions()
            if call.name == "trades":
                return await gw.trades()
            if call.name == "secdef":
                return await gw.secdef(call.args[0])
        except PenaltyBox as exc:
            return CallFailed(str(exc), exc.kind.value, gw.penalty_remaining())
        except GatewayError as exc:
            return CallFailed(str(exc), exc.kind.value)
        raise ValueError(f"IbkrClient makes no {call.name!r} call")
