"""The IBKR I/O shell: gateway session, websocket, heartbeats, re-subscription, positions.

One connection = one `_Link` with its own nursery: a reader (which is also the watchdog),
a `tic` loop, a `/tickle` loop, an smd renewal loop (IBKR ends every smd stream after 10
minutes) and a positions refresher. Any of them losing the link cancels the others; `run`
then waits (`Reconnect`: backoff if the gateway refused, a cheap TCP probe every ~2 s
while it is unreachable) and starts over with a fresh session and full re-subscription.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from greeksd.backoff import Backoff, Reconnect, url_address
from greeksd.brokers.ibkr import connection as c
from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.gateway import (
    GatewayClient,
    GatewayError,
    NotAuthenticated,
    PenaltyBox,
)
from greeksd.brokers.ibkr.protocol import OptionPosition
from greeksd.brokers.ibkr.spec import IbkrSettings
from greeksd.logs import get_logger, log_context
from greeksd.model import ContractKey, Recorder, SnapshotSink, StreamState, StreamStatus
from greeksd.redact import register_secret

log = get_logger("greeksd.ibkr.stream")

LINK_ERRORS = (GatewayError, HandshakeError, ConnectionClosed, trio.BrokenResourceError, OSError)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class LinkLost(Exception):
    """The websocket or the session is gone; `run` reconnects."""


def describe(exc: BaseException) -> str:
    """A short reason for status and logs (never a cookie: those are not in exceptions)."""
    if isinstance(exc, NotAuthenticated):
        return exc.reason
    if isinstance(exc, ConnectionRejected):
        return f"websocket upgrade refused (HTTP {exc.status_code})"
    if isinstance(exc, ConnectionClosed):
        why = exc.reason
        return f"websocket closed ({why.code} {why.name})" if why else "websocket closed"
    if isinstance(exc, LinkLost | GatewayError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class LinePlan:
    """Which conids get one of the account's limited market-data lines: options first,
    largest |position| first (Greeks matter more than the underlying's price), then the
    underlyings of the subscribed options with what is left."""

    options: list[OptionPosition]
    underlyings: list[int]
    left_out: list[OptionPosition]

    @classmethod
    def build(cls, positions: Iterable[OptionPosition], max_lines: int) -> LinePlan:
        ranked = sorted(positions, key=lambda o: (-abs(o.contract.quantity), str(o.contract.key)))
        options, left_out = ranked[:max_lines], ranked[max_lines:]
        unds = list(dict.fromkeys(o.und_conid for o in options if o.und_conid is not None))
        return cls(options, unds[: max_lines - len(options)], left_out)

    def wanted(self) -> dict[int, tuple[str, ...]]:
        lines = {o.conid: p.OPTION_FIELDS for o in self.options}
        return lines | {u: p.UNDERLYING_FIELDS for u in self.underlyings}


def open_socket(
    gw: GatewayClient,
    session: str,
    ssl_context: ssl.SSLContext | None = None,
    *,
    disconnect_timeout: float = 2.0,
) -> Any:
    """The websocket, logged in by the `api={"session": …}` cookie on the upgrade."""
    cookie = p.session_cookie(session).encode()
    return open_websocket_url(
        gw.ws_url,
        ssl_context=ssl_context or gw.ssl_context,
        extra_headers=[(b"Cookie", cookie)],
        connect_timeout=10.0,
        disconnect_timeout=disconnect_timeout,
    )


class IbkrStream:
    """`Source` for IBKR: every Greeks tick of every option position into the sink."""

    name = "ibkr"

    def __init__(
        self,
        url: str = "https://localhost:5000",
        *,
        ca_file: Path | None = None,
        verify_tls: bool = False,
        heartbeat_s: float = 60.0,
        tickle_s: float = 60.0,
        watchdog_s: float = 30.0,
        positions_refresh_s: float = 60.0,
        smd_refresh_s: float = 540.0,
        max_lines: int = 100,
        rest_min_interval: float = 0.1,
        backoff: Backoff | None = None,
        probe_interval_s: float = 2.0,
        recorder: Recorder | None = None,
    ) -> None:
        self.url = url
        self.ca_file = ca_file
        self.verify_tls = verify_tls
        self.heartbeat_s = heartbeat_s
        self.tickle_s = tickle_s
        self.watchdog_s = watchdog_s
        self.positions_refresh_s = positions_refresh_s
        self.smd_refresh_s = smd_refresh_s
        self.max_lines = max_lines
        self.rest_min_interval = rest_min_interval
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self.reconnect = Reconnect(self.backoff, probe_interval=probe_interval_s)
        self.recorder = recorder  # `greeksd record`: frames, positions, new links
        # Every option conid ever seen (positions, secdef): an execution names its option
        # only by conid, and a closing fill arrives after the position is gone.
        self.option_keys: dict[int, ContractKey] = {}

    @classmethod
    def from_settings(cls, settings: IbkrSettings, recorder: Recorder | None) -> IbkrStream:
        return cls(
            settings.url,
            ca_file=settings.ca_file,
            verify_tls=settings.verify_tls,
            heartbeat_s=settings.heartbeat_s,
            positions_refresh_s=settings.positions_refresh_s,
            max_lines=settings.max_lines,
            recorder=recorder,
        )

    async def run(self, sink: SnapshotSink, status: StreamStatus) -> None:
        with log_context(broker="ibkr"):
            status.set_state(StreamState.CONNECTING, now=_now())
            async with GatewayClient(
                self.url,
                ca_file=self.ca_file,
                verify_tls=self.verify_tls,
                min_interval=self.rest_min_interval,
            ) as gw:
                while True:
                    try:
                        await self._connect_once(gw, sink, status)
                    except (LinkLost, *LINK_ERRORS) as exc:
                        reason = describe(exc)
                    status.last_error = reason
                    status.reconnects += 1
                    status.set_state(StreamState.DEGRADED, reason, now=_now())
                    log.warning("ibkr_link_lost", reason=reason)
                    penalty = gw.penalty_remaining()
                    if penalty > 0:  # not one request before IBKR's penalty box is over
                        status.details["penalty_box_until"] = _iso(gw.penalty_until)
                        log.warning("ibkr_penalty_box_wait", seconds=round(penalty, 1))
                        await trio.sleep(penalty)
                    else:
                        await self.reconnect.pause(status, url_address(self.url))

    async def _connect_once(
        self, gw: GatewayClient, sink: SnapshotSink, status: StreamStatus
    ) -> None:
        info = await gw.tickle()
        if info.problem:
            raise NotAuthenticated(info.problem)
        if not info.session:
            raise GatewayError("/tickle returned no session token")
        register_secret(info.session)
        await gw.iserver_accounts()  # without this call the gateway sends no market data
        positions = await load_option_positions(gw, status)
        async with open_socket(gw, info.session) as ws:
            if self.recorder is not None:
                self.recorder.link(self.name, _now())
            link = _Link(self, gw, ws, sink, status, positions, info.session)
            async with trio.open_nursery() as nursery:
                link.scope = nursery.cancel_scope
                nursery.start_soon(link.guard, link.read)
                nursery.start_soon(link.guard, link.tic_loop)
                nursery.start_soon(link.guard, link.tickle_loop)
                nursery.start_soon(link.guard, link.renew_loop)
                nursery.start_soon(link.guard, link.positions_loop)
                nursery.start_soon(link.guard, link.trades_backfill)
        raise LinkLost(link.lost or "websocket closed")


async def load_option_positions(
    gw: GatewayClient, status: StreamStatus | None = None
) -> list[OptionPosition]:
    scan = await gw.option_positions()
    for problem in scan.problems:
        log.warning("ibkr_position_skipped", reason=problem)
    if status is not None:
        if scan.future_options != status.details.get("skipped_future_options", 0):
            log.info("ibkr_future_options_skipped", count=scan.future_options)
        status.details["skipped_future_options"] = scan.future_options
        status.details["unparsable_positions"] = len(scan.problems)
    return scan.options


@dataclass(eq=False)
class _Link:
    """State of one websocket connection; discarded on reconnect."""

    stream: IbkrStream
    gw: GatewayClient
    ws: WebSocketConnection
    sink: SnapshotSink
    status: StreamStatus
    positions: list[OptionPosition]
    session: str
    book: p.MarketDataBook = field(default_factory=p.MarketDataBook)
    session_state: c.SessionState = field(default_factory=c.SessionState)
    lines: dict[int, tuple[str, ...]] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    lost: str | None = None

    async def guard(self, task: Callable[[], Awaitable[None]]) -> None:
        """Turn any link failure into one recorded reason and a cancelled link."""
        try:
            await task()
        except (LinkLost, *LINK_ERRORS) as exc:
            self.lose(describe(exc))

    def lose(self, reason: str) -> None:
        self.lost = self.lost or reason
        self.scope.cancel()

    async def read(self) -> None:
        watchdog = self.stream.watchdog_s
        while True:
            with trio.move_on_after(watchdog) as timer:
                message = await self.ws.get_message()
            if timer.cancelled_caught:
                raise LinkLost(f"no message for {watchdog:g}s (watchdog)")
            received_at = _now()
            self.status.last_message_at = received_at
            if self.stream.recorder is not None:
                self.stream.recorder.frame(self.stream.name, message, received_at)
            await self.handle(p.parse_frame(message), received_at)

    async def handle(self, event: p.Event, received_at: datetime) -> None:
        status = self.status
        match event:
            case p.MarketData():
                snapshot = self.book.apply(event, received_at)
                if snapshot is not None:
                    self.sink.put(snapshot)
                    status.ticks += 1
                if p.AVAILABILITY in event.fields:  # bookkeeping frames: rare
                    self.report_quality()
            case p.Trades(executions=executions):
                await self.record_trades(executions)
            case p.AuthStatus():  # possibly partial: merged, decided in `connection`
                verdict = self.session_state.update(event)
                if isinstance(verdict, c.Lost):
                    raise NotAuthenticated(verdict.reason)
                if isinstance(verdict, c.Ready) and not self.ready.is_set():
                    await self.subscribe(self.positions)
                    await self.ws.send_message(p.TRADES_SUBSCRIBE)
                    self.ready.set()
                    self.stream.backoff.reset()
                    status.details.pop("penalty_box_until", None)
                    status.set_state(StreamState.CONNECTED, now=_now())
                    log.info("ibkr_connected", lines=len(self.lines))
            case p.Malformed(reason=reason, raw=raw):
                status.rejected_frames += 1
                log.warning("ibkr_bad_frame", reason=reason, frame=raw[:80])
            case p.GatewayErrorMessage(message=message, code=code):
                status.details["gateway_errors"] = status.details.get("gateway_errors", 0) + 1
                log.warning("ibkr_gateway_error", message=message, code=code)
            case p.WaitingForSession():  # an old gateway ignored the cookie: legacy login
                await self.ws.send_message(p.frame({"session": self.session}))
            case p.LoggedIn() | p.Accounts() | p.Notice():
                log.info("ibkr_notice", kind=type(event).__name__, detail=str(event)[:200])
            case p.Unknown(payload=payload):
                log.debug("ibkr_unknown_frame", topic=payload.get("topic"))

    async def subscribe(self, positions: list[OptionPosition]) -> None:
        """Bring the lines to the plan for `positions`: smd what is new, umd what is gone."""
        self.stream.option_keys.update((o.conid, o.contract.key) for o in positions)
        plan = LinePlan.build(positions, self.stream.max_lines)
        wanted = plan.wanted()
        for option in plan.options:
            self.book.track(option)
        gone = [c for c in self.lines if c not in wanted]
        for conid in gone:  # the book changes at once, not between awaits: replayable
            self.book.untrack(conid)
            del self.lines[conid]
        if self.stream.recorder is not None:
            self.stream.recorder.positions(
                self.stream.name, plan.options, _now(), lines=sorted(wanted)
            )
        for conid in gone:
            await self.ws.send_message(p.umd_command(conid))
        for conid, fields in wanted.items():
            if conid not in self.lines:
                self.lines[conid] = fields
                await self.ws.send_message(p.smd_command(conid, fields))
        left_out = [str(o.contract.key) for o in plan.left_out]
        if left_out != self.status.details.get("left_out", []):
            log.warning(
                "ibkr_lines_left_out",
                count=len(left_out),
                max_lines=self.stream.max_lines,
                contracts=",".join(left_out),
            )
        self.status.details["left_out"] = left_out
        self.status.subscriptions = len(self.lines)
        self.report_quality()

    def report_quality(self) -> None:
        """Status counts of held options whose data is delayed or frozen (field 6509),
        logged when they change: such rows are flagged, never passed off as live."""
        counts = self.book.quality_counts()
        details = self.status.details
        if any(details.get(k, 0) != v for k, v in counts.items()) and any(counts.values()):
            log.warning("ibkr_market_data_not_live", **counts)
        details.update(counts)

    def rest_failed(self, event: str, exc: GatewayError, **fields: Any) -> None:
        """A REST call of a running link failed: log it; a penalty box also degrades the
        status (the websocket keeps streaming, `tic` keeps the session alive)."""
        log.warning(event, error=str(exc), **fields)
        if isinstance(exc, PenaltyBox):
            self.status.details["penalty_box_until"] = _iso(self.gw.penalty_until)
            self.status.set_state(StreamState.DEGRADED, str(exc), now=_now())

    def rest_ok(self) -> None:
        """A REST call succeeded again: a penalty box that degraded the link is over
        (unless this call was answered before a concurrent one drew the 429)."""
        if self.gw.penalty_remaining() > 0:
            return
        if self.status.details.pop("penalty_box_until", None) and self.ready.is_set():
            self.status.set_state(StreamState.CONNECTED, now=_now())
            log.info("ibkr_penalty_box_over")

    async def trades_backfill(self) -> None:
        """Once per connection: executions that happened while no socket listened. The
        live `str` topic may deliver some of them too; the trades table keeps one row."""
        await self.ready.wait()
        try:
            executions = await self.gw.trades()
        except NotAuthenticated:
            raise
        except GatewayError as exc:  # the live topic still works; the next link retries
            self.rest_failed("ibkr_trades_backfill_failed", exc)
            return
        await self.record_trades(executions)

    async def record_trades(self, executions: Iterable[dict[str, Any]]) -> None:
        """Map executions to trades (options by conid; unknown option conids through one
        secdef call) and hand them to the sink; a bad execution is counted and logged."""
        executions = list(executions)
        keys = self.stream.option_keys
        unknown = {
            conid
            for e in executions
            if p.is_option_execution(e) and (conid := p.execution_conid(e)) is not None
        } - keys.keys()
        if unknown:
            await self.learn_option_keys(unknown)
        details = self.status.details
        for execution in executions:
            conid = p.execution_conid(execution)
            try:
                trade = p.execution_trade(execution, keys.get(conid) if conid else None)
            except ValueError as exc:
                details["rejected_trades"] = details.get("rejected_trades", 0) + 1
                log.warning("ibkr_execution_rejected", reason=str(exc))
                continue
            if trade.contract_key is None and p.is_option_execution(execution):
                log.warning("ibkr_execution_without_key", execution=trade.broker_trade_id)
            self.sink.put_trade(trade)
            details["trades"] = details.get("trades", 0) + 1

    async def learn_option_keys(self, conids: set[int]) -> None:
        try:
            secdefs = await self.gw.secdef(sorted(conids))
        except NotAuthenticated:
            raise
        except GatewayError as exc:
            self.rest_failed("ibkr_secdef_failed", exc, conids=len(conids))
            return
        for conid, secdef in secdefs.items():
            try:
                self.stream.option_keys[conid] = p.option_key(secdef)
            except ValueError as exc:
                log.warning("ibkr_secdef_unusable", conid=conid, reason=str(exc))

    async def tic_loop(self) -> None:
        while True:
            await trio.sleep(self.stream.heartbeat_s)
            await self.ws.send_message(p.TIC)

    async def tickle_loop(self) -> None:
        while True:
            await trio.sleep(self.stream.tickle_s)
            try:
                info = await self.gw.tickle()
            except PenaltyBox as exc:  # no REST for now; the websocket's `tic` goes on
                self.rest_failed("ibkr_tickle_skipped", exc)
                await trio.sleep(self.gw.penalty_remaining())
                continue
            if info.problem:
                raise NotAuthenticated(info.problem)
            self.rest_ok()

    async def renew_loop(self) -> None:
        """Re-send every smd before IBKR's 10-minute stream expiry."""
        await self.ready.wait()
        while True:
            await trio.sleep(self.stream.smd_refresh_s)
            for conid, fields in list(self.lines.items()):
                if conid in self.lines:  # not unsubscribed while we were sending
                    await self.ws.send_message(p.smd_command(conid, fields))

    async def positions_loop(self) -> None:
        await self.ready.wait()
        while True:
            await trio.sleep(self.stream.positions_refresh_s)
            try:
                self.positions = await load_option_positions(self.gw, self.status)
            except NotAuthenticated:
                raise
            except GatewayError as exc:  # keep streaming what we have; next refresh retries
                self.rest_failed("ibkr_positions_refresh_failed", exc)
                await trio.sleep(self.gw.penalty_remaining())
                continue
            self.rest_ok()
            await self.subscribe(self.positions)
