"""Source "tastytrade": the link runner (`greeksd.brokers.link`) with Tastytrade's REST
client and one `DxlinkConnection` per link.

`TastytradeClient` is the REST side, I/O only: before each link the SDK session (OAuth),
the held positions and, only when there is none yet or the last one was refused, a
quote token; during a link the positions refreshes and trades polls the Connection
asks for. Everything DXLink means (handshake, channel, subscriptions, deadlines, rows,
trades) is the Connection's.

Failures before a socket leave as `LinkDown`: a refused OAuth credential (the server
answered: only the backoff applies, and the next attempt logs in again) or any other
REST failure (the REST API is probed while it is unreachable). During a link a failing
call is answered as `CallFailed`, which never ends the link.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from tastytrade import API_URL

from greeksd.backoff import Address, Backoff, url_address
from greeksd.brokers.link import (
    BrokerStream,
    Call,
    CallFailed,
    Connection,
    LinkDown,
    LinkTarget,
)
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.connection import (
    CHANNEL_OPEN_TIMEOUT_S,
    OAUTH_REFUSED,
    POSITIONS,
    TRADES,
    DxlinkConnection,
    DxlinkOptions,
    TastytradeCounters,
)
from greeksd.brokers.tastytrade.session import (
    QuoteToken,
    TastytradeApi,
    TastytradeApiError,
    TastytradeAuthError,
)
from greeksd.brokers.tastytrade.spec import TastytradeSettings
from greeksd.coverage import Coverage
from greeksd.model import Recorder, StreamStatus

MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""Bursts of FEED_DATA exceed the 64 KiB limit the SDK keeps (and dies on, with 1009)."""


class TastytradeClient:
    """The `BrokerClient` of one Tastytrade login. Its `mapper` (held contracts,
    underlying prices) and `counters` carry over from link to link."""

    def __init__(
        self, api: TastytradeApi, options: DxlinkOptions, *, rest_url: str | None = None
    ) -> None:
        """`rest_url`: the REST API's base URL, probed while it is unreachable (None:
        REST failures only back off)."""
        self.api = api
        self.options = options
        self.counters = TastytradeCounters()
        self.mapper = dx.SnapshotMapper()
        self._rest_address = url_address(rest_url) if rest_url else None
        self._token: QuoteToken | None = None
        self._session: AsyncExitStack | None = None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[TastytradeClient]:
        """For one run of the stream; the SDK session is opened on first use."""
        self._token = None
        try:
            yield self
        finally:
            await self._logout()

    def address(self) -> Address | None:
        return url_address(self._token.dxlink_url) if self._token else self._rest_address

    async def open_link(self, status: StreamStatus, fresh_credentials: bool) -> LinkTarget:
        status.counters = self.counters
        if fresh_credentials:
            self._token = None
        async with self._rest_errors():
            positions = await self.positions()
            token = await self.quote_token()
        return self.link_target(token, self.connection(token, positions, status.coverage))

    async def positions(self) -> dx.Positions:
        await self._login()
        return await self.api.positions()

    async def quote_token(self) -> QuoteToken:
        """The token in hand, or a fresh one (only when there is none, or it was refused)."""
        if self._token is None:
            await self._login()
            self._token = await self.api.quote_token()
            self.counters.token_fetches += 1
        return self._token

    def connection(
        self, token: QuoteToken, positions: dx.Positions, coverage: Coverage | None = None
    ) -> DxlinkConnection:
        """The Connection of the next link (this client's mapper and counters, the
        status's coverage tracker)."""
        return DxlinkConnection(
            token.token,
            self.options,
            positions=positions,
            mapper=self.mapper,
            counters=self.counters,
            coverage=coverage,
        )

    def link_target(self, token: QuoteToken, connection: Connection) -> LinkTarget:
        """The websocket to open for `token`, and the Connection that speaks on it."""
        return LinkTarget(
            token.dxlink_url,
            connection,
            max_message_size=MAX_MESSAGE_SIZE,
            connect_timeout=self.options.handshake_timeout,
            record={"channel": self.options.channel},
        )

    async def call(self, call: Call) -> Any:
        try:
            if call == POSITIONS:
                return await self.api.positions()
            if call == TRADES:
                return await self.api.transactions()
        except TastytradeAuthError as exc:
            return CallFailed(str(exc), OAUTH_REFUSED)
        except TastytradeApiError as exc:
            return CallFailed(str(exc))
        raise ValueError(f"no such Tastytrade call: {call!r}")

    @asynccontextmanager
    async def _rest_errors(self) -> AsyncIterator[None]:
        try:
            yield
        except TastytradeAuthError as exc:
            await self._logout()  # the next attempt logs in afresh
            raise LinkDown(str(exc)) from exc  # it answered: only the backoff applies
        except TastytradeApiError as exc:
            raise LinkDown(str(exc), address=self._rest_address) from exc

    async def _login(self) -> None:
        if self._session is None:
            stack = AsyncExitStack()
            await stack.enter_async_context(self.api.open())
            self._session = stack

    async def _logout(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.aclose()


class TastytradeStream(BrokerStream):
    """Source "tastytrade": Greeks of every open option position, as Snapshot rows."""

    def __init__(
        self,
        api: TastytradeApi,
        *,
        positions_refresh_s: float = 60.0,
        keepalive_timeout: float = 60.0,
        handshake_timeout: float = 15.0,
        aggregation_period: float = 0.1,
        channel: int = 1,
        backoff: Backoff | None = None,
        rest_url: str | None = None,
        probe_interval_s: float = 2.0,
        subscription_chunk_bytes: int = dx.SUBSCRIPTION_CHUNK_BYTES,
        channel_open_timeout: float = CHANNEL_OPEN_TIMEOUT_S,
        recorder: Recorder | None = None,
        name: str = "tastytrade",
    ) -> None:
        """`rest_url`: see `TastytradeClient`. `channel_open_timeout`: how long a
        CHANNEL_REQUEST may go unanswered before it counts as refused and is retried."""
        options = DxlinkOptions(
            channel=channel,
            keepalive_timeout=keepalive_timeout,
            handshake_timeout=handshake_timeout,
            aggregation_period=aggregation_period,
            channel_open_timeout=channel_open_timeout,
            positions_refresh_s=positions_refresh_s,
            subscription_chunk_bytes=subscription_chunk_bytes,
        )
        self.client = TastytradeClient(api, options, rest_url=rest_url)
        super().__init__(
            name,
            self.client.open,
            backoff=backoff,
            probe_interval_s=probe_interval_s,
            recorder=recorder,
        )

    @classmethod
    def from_settings(
        cls, settings: TastytradeSettings, recorder: Recorder | None, *, name: str = "tastytrade"
    ) -> TastytradeStream:
        """The stream `greeksd run` starts, from the `GREEKSD_TT_*` settings."""
        api = TastytradeApi(
            settings.secret,
            settings.refresh,
            account=settings.account,
            api_url=settings.api_url,
        )
        return cls(
            api,
            positions_refresh_s=settings.positions_refresh_s,
            rest_url=settings.api_url or API_URL,
            recorder=recorder,
            name=name,
        )
