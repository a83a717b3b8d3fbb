"""One IBKR websocket link's whole protocol, without I/O: `IbkrConnection`.

Frames, REST answers and clock readings in; rows, trades, frames to send, REST calls
wanted and the link's fate out (the vocabulary of greeksd.brokers.link). The link runner
performs what it asks for the live stream, the probe feeds it from its own socket, and
replay feeds it a recording, so the handshake, the line plan, the merge book, every
deadline and the mapping to rows are written once, here.

What it does, in the order a link lives:
- `sts` (possibly split over several frames, `SessionState`) says authenticated: one
  `smd` per line of the `LinePlan`, `str+{}` for executions, the link is up, the trades
  backfill is asked for. `sts` saying competing or not authenticated ends the link.
- `tic` every `heartbeat_s`, `/tickle` every `tickle_s` (a `Call`), every `smd` again
  every `smd_refresh_s` (IBKR ends each smd stream after 10 minutes), the positions
  every `positions_refresh_s` (new lines `smd`, gone ones `umd`), and no inbound frame
  for `watchdog_s` ends the link.
- A REST call answered 429 is IBKR's penalty box: the link stays up but degraded, no
  call is asked for until it is over, and a link ending inside it says how long to wait.
- Executions (`str` or the backfill) become trades; an option conid never seen in the
  positions is looked up by one secdef call first.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.protocol import OptionPosition, PositionScan
from greeksd.brokers.ibkr.session import SESSION_GONE, Failure, Lost, SessionState
from greeksd.brokers.link import (
    Call,
    CallFailed,
    Degraded,
    Event,
    LinkFailed,
    LinkUp,
    Note,
    Recovered,
    Rejected,
    Send,
    Tracked,
)
from greeksd.coverage import Coverage
from greeksd.model import ContractKey

DEFAULT_MAX_LINES = 100

#: The REST calls a link asks for (a secdef lookup carries its conids, so it is built
#: per lookup). Answers: `SessionInfo`, `PositionScan`, a list of executions, and
#: {conid: secdef} for `Call("secdef", (conids,))`.
TICKLE, POSITIONS, TRADES = Call("tickle"), Call("positions"), Call("trades")

_NOTHING: list[Event] = []
"""What a frame that asks for nothing returns (shared, never mutated: no allocation on
the tick path)."""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How often a link does what IBKR needs, and how many lines it may use."""

    heartbeat_s: float = 60.0  # `tic` keeps the websocket's session alive
    tickle_s: float = 60.0  # /tickle keeps the gateway's session alive
    watchdog_s: float = 30.0  # this long without an inbound frame ends the link
    positions_refresh_s: float = 60.0
    smd_refresh_s: float = 540.0  # before IBKR's 10-minute smd expiry
    max_lines: int = DEFAULT_MAX_LINES  # the account's concurrent market-data lines


@dataclass(slots=True)
class IbkrCounters:
    """IBKR's own facts on the stream status (`StreamStatus.counters`, shown flat in the
    API): updated by the Connection, and by the client for a penalty box at connect."""

    trades: int = 0
    rejected_trades: int = 0
    gateway_errors: int = 0
    unparsable_positions: int = 0
    unsupported_positions: int = 0
    unsupported_reasons: dict[str, int] = field(default_factory=dict)
    """Why held options greeksd cannot record are left out (e.g. a futures option whose
    future the gateway does not name), with how many: the same shape as Tastytrade's."""
    delayed_contracts: int = 0
    frozen_contracts: int = 0
    left_out: list[str] = field(default_factory=list)
    """Options held but not streamed: more than `max_lines` positions."""
    penalty_box_until: datetime | None = None


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


class IbkrConnection:
    """One websocket link (greeksd.brokers.link's `Connection`); a new link is a new one.

    `scan` is what the positions call answered before the socket opened (its options are
    planned and tracked at once, so the probe can read `plan` before connecting);
    `option_keys` outlives links (a closing fill arrives after its position is gone, and
    names its option only by conid); `counters` is the status's `IbkrCounters`, and
    `coverage` the status's `Coverage`, fed with what each smd update itself carried."""

    def __init__(
        self,
        session: str = "",
        scan: PositionScan | None = None,
        *,
        settings: LinkSettings | None = None,
        option_keys: dict[int, ContractKey] | None = None,
        counters: IbkrCounters | None = None,
        coverage: Coverage | None = None,
    ) -> None:
        self.session = session
        self.coverage = coverage or Coverage("ibkr")
        self.coverage.data = "smd data"
        self.settings = settings or LinkSettings()
        self.option_keys = {} if option_keys is None else option_keys
        self.counters = counters or IbkrCounters()
        self.book = p.MarketDataBook()
        self.session_state = SessionState()
        self.plan = LinePlan([], [], [])
        self.wanted: dict[int, tuple[str, ...]] = {}
        self.lines: dict[int, tuple[str, ...]] = {}
        """What is subscribed on this socket (`wanted` once the link is up)."""
        self.ready = False
        self.market_frames = 0
        """Market-data frames received, whatever they changed (for the probe's report)."""
        self._watchdog_s = self.settings.watchdog_s
        self._silent_at = self._tic_at = self._tickle_at = math.inf
        self._renew_at = self._refresh_at = math.inf
        self._penalty_until = -math.inf
        self._waiting: list[tuple[Call, Sequence[Mapping[str, Any]]]] = []
        self._opening = self._take_scan(scan or PositionScan([], []))

    # ---- the Connection protocol --------------------------------------------------------
    def start(self, now: float, at: datetime) -> list[Event]:
        """The cookie on the upgrade logs the socket in: nothing to send until `sts`."""
        settings = self.settings
        self._silent_at = now + self._watchdog_s
        self._tic_at = now + settings.heartbeat_s
        self._tickle_at = now + settings.tickle_s
        events, self._opening = self._opening, []
        return events

    def receive(self, data: str | bytes, now: float, at: datetime) -> list[Event]:
        self._silent_at = now + self._watchdog_s
        event = p.parse_frame(data)
        if isinstance(event, p.MarketData):
            self.market_frames += 1
            row = self.book.apply(event, at)
            fields = event.fields
            self.coverage.update(
                event.conid, at, _carries(fields, _GREEK), _carries(fields, _PRICES)
            )
            if p.AVAILABILITY in fields:  # bookkeeping fields: rare
                self.coverage.quality(event.conid, self.book.market_data(event.conid))
                quality = self._quality()
                return quality if row is None else [row, *quality]
            return _NOTHING if row is None else [row]
        return self._control(event, now)

    def set_positions(
        self, positions: Sequence[OptionPosition], now: float, at: datetime
    ) -> list[Event]:
        return self._adopt(positions)

    def answer(self, call: Call, result: Any, now: float, at: datetime) -> list[Event]:
        if isinstance(result, CallFailed):
            return self._call_failed(call, result, now, at)
        settings = self.settings
        if call.name == "tickle":
            if result.problem:  # the gateway answers, but the session is unusable
                return [self._fail(result.problem, now)]
            self._tickle_at = now + settings.tickle_s
            return self._rest_ok(now)
        if call.name == "positions":
            self._refresh_at = now + settings.positions_refresh_s
            return self._rest_ok(now) + self._take_scan(result)
        if call.name == "trades":
            return self._rest_ok(now) + self._executions(result)
        if call.name == "secdef":
            return self._rest_ok(now) + self._learn(call, result)
        raise ValueError(f"IbkrConnection asked for no {call.name!r} call")

    def on_timer(self, now: float, at: datetime) -> list[Event]:
        settings = self.settings
        if now >= self._silent_at:
            self._silent_at = math.inf
            return [self._fail(f"no message for {self._watchdog_s:g}s (watchdog)", now)]
        events: list[Event] = []
        if now >= self._tic_at:
            self._tic_at = now + settings.heartbeat_s
            events.append(Send(p.TIC))
        if now >= self._tickle_at:
            self._tickle_at = math.inf  # until answered
            events.append(TICKLE)
        if now >= self._renew_at:
            self._renew_at = now + settings.smd_refresh_s
            events += [Send(p.smd_command(c, fields)) for c, fields in self.lines.items()]
        if now >= self._refresh_at:
            self._refresh_at = math.inf  # until answered
            events.append(POSITIONS)
        return events

    def next_deadline(self) -> float:
        return min(self._silent_at, self._tic_at, self._tickle_at, self._renew_at, self._refresh_at)

    # ---- frames -------------------------------------------------------------------------
    def _control(self, event: p.Event, now: float) -> list[Event]:
        match event:
            case p.AuthStatus():  # possibly partial: merged, decided by SessionState
                return self._status(event, now)
            case p.Trades(executions=executions):
                return self._executions(executions)
            case p.Malformed(reason=reason, raw=raw):
                return [Rejected("malformed_frame", reason, raw[:80])]
            case p.GatewayErrorMessage(message=message, code=code):
                self.counters.gateway_errors += 1
                return [Note("ibkr_gateway_error", {"message": message, "code": code}, "warning")]
            case p.WaitingForSession():  # an old gateway ignored the cookie: legacy login
                return [Send(p.frame({"session": self.session}))]
            case p.LoggedIn() | p.Accounts() | p.Notice():
                detail = {"kind": type(event).__name__, "detail": str(event)[:200]}
                return [Note("ibkr_notice", detail)]
            case p.Unknown(payload=payload):
                return [Note("ibkr_unknown_frame", {"topic": payload.get("topic")}, "debug")]
        return _NOTHING  # heartbeats, tic replies, echoes: they only keep the link alive

    def _status(self, sts: p.AuthStatus, now: float) -> list[Event]:
        verdict = self.session_state.update(sts)
        if isinstance(verdict, Lost):
            return [self._fail(verdict.reason, now)]
        if verdict is None or self.ready:
            return _NOTHING
        self.ready = True
        self.counters.penalty_box_until = None
        self._renew_at = now + self.settings.smd_refresh_s
        self._refresh_at = now + self.settings.positions_refresh_s
        return [*self._subscribe(), Send(p.TRADES_SUBSCRIBE), LinkUp(), TRADES]

    # ---- positions and lines ------------------------------------------------------------
    def _take_scan(self, scan: PositionScan) -> list[Event]:
        """A positions answer: what could not be used is logged and counted."""
        counters = self.counters
        events: list[Event] = [
            Note("ibkr_position_skipped", {"reason": problem}, "warning")
            for problem in scan.problems
        ]
        reasons = dict(collections.Counter(scan.unsupported))
        if reasons != counters.unsupported_reasons:  # logged once, not every refresh
            events += [
                Note("ibkr_position_unsupported", {"reason": reason, "count": count}, "warning")
                for reason, count in reasons.items()
            ]
        counters.unsupported_reasons = reasons
        counters.unsupported_positions = len(scan.unsupported)
        counters.unparsable_positions = len(scan.problems)
        return events + self._adopt(scan.options)

    def _adopt(self, positions: Sequence[OptionPosition]) -> list[Event]:
        """Plan lines for `positions`; the book tracks them at once (the lines follow
        once the link is up: no market data flows before)."""
        self.option_keys.update((o.conid, o.contract.key) for o in positions)
        settings, counters = self.settings, self.counters
        before, plan = self.wanted, LinePlan.build(positions, settings.max_lines)
        self.plan, self.wanted = plan, plan.wanted()
        for option in plan.options:
            self.book.track(option)
        for conid in before:
            if conid not in self.wanted:
                self.book.untrack(conid)
        events: list[Event] = []
        left_out = [str(o.contract.key) for o in plan.left_out]
        if left_out != counters.left_out:
            fields = {"count": len(left_out), "max_lines": settings.max_lines}
            events.append(
                Note("ibkr_lines_left_out", {**fields, "contracts": ",".join(left_out)}, "warning")
            )
        counters.left_out = left_out
        self.coverage.track((o.conid, o.contract) for o in plan.options)
        self.coverage.left_out = len(left_out)
        return (events + self._subscribe()) if self.ready else events

    def _subscribe(self) -> list[Event]:
        """Bring the socket's lines to the plan: `umd` what is gone, `smd` what is new."""
        wanted, lines = self.wanted, self.lines
        sends: list[Event] = []
        for conid in [c for c in lines if c not in wanted]:
            del lines[conid]
            sends.append(Send(p.umd_command(conid)))
        for conid, fields in wanted.items():
            if conid not in lines:
                lines[conid] = fields
                sends.append(Send(p.smd_command(conid, fields)))
        tracked = Tracked(self.plan.options, len(lines), {"lines": sorted(wanted)})
        return [tracked, *sends, *self._quality()]

    def _quality(self) -> list[Event]:
        """Counts of held options whose data is delayed or frozen (field 6509), logged
        when they change: such rows are flagged, never passed off as live."""
        counts, counters = self.book.quality_counts(), self.counters
        delayed, frozen = counts["delayed_contracts"], counts["frozen_contracts"]
        changed = (delayed, frozen) != (counters.delayed_contracts, counters.frozen_contracts)
        counters.delayed_contracts, counters.frozen_contracts = delayed, frozen
        if changed and (delayed or frozen):
            return [Note("ibkr_market_data_not_live", counts, "warning")]
        return []

    # ---- executions ---------------------------------------------------------------------
    def _executions(self, executions: Sequence[Mapping[str, Any]]) -> list[Event]:
        """Trades for executions; option conids never seen are looked up first."""
        keys = self.option_keys
        unknown = {
            conid
            for e in executions
            if p.is_option_execution(e)
            and (conid := p.execution_conid(e)) is not None
            and conid not in keys
        }
        if not unknown:
            return self._trades(executions)
        lookup = Call("secdef", (tuple(sorted(unknown)),))
        self._waiting.append((lookup, executions))
        return [lookup]

    def _learn(self, lookup: Call, secdefs: Mapping[int, Mapping[str, Any]]) -> list[Event]:
        """A secdef answer (empty when it failed): the keys, then the trades that waited."""
        events: list[Event] = []
        for conid, secdef in secdefs.items():
            try:
                self.option_keys[conid] = p.option_key(secdef)
            except ValueError as exc:
                fields = {"conid": conid, "reason": str(exc)}
                events.append(Note("ibkr_secdef_unusable", fields, "warning"))
        for i, (waiting, executions) in enumerate(self._waiting):
            if waiting is lookup:
                del self._waiting[i]
                return events + self._trades(executions)
        return events

    def _trades(self, executions: Iterable[Mapping[str, Any]]) -> list[Event]:
        keys, counters = self.option_keys, self.counters
        events: list[Event] = []
        for execution in executions:
            conid = p.execution_conid(execution)
            try:
                trade = p.execution_trade(execution, keys.get(conid) if conid else None)
            except ValueError as exc:
                counters.rejected_trades += 1
                events.append(Note("ibkr_execution_rejected", {"reason": str(exc)}, "warning"))
                continue
            if trade.contract_key is None and p.is_option_execution(execution):
                fields = {"execution": trade.broker_trade_id}
                events.append(Note("ibkr_execution_without_key", fields, "warning"))
            events.append(trade)
            counters.trades += 1
        return events

    # ---- REST outcomes ------------------------------------------------------------------
    def _call_failed(self, call: Call, failed: CallFailed, now: float, at: datetime) -> list[Event]:
        """A call failed: the session gone ends the link, as does a /tickle that got no
        answer; anything else is logged and retried at its next turn. A penalty box
        degrades the link and moves every next turn past its end."""
        kind = Failure(failed.kind) if failed.kind in _FAILURE_KINDS else Failure.ERROR
        if kind in SESSION_GONE or (call.name == "tickle" and kind is not Failure.PENALTY_BOX):
            return [self._fail(failed.reason, now)]
        settings = self.settings
        wait = 0.0
        events: list[Event] = [Note(_FAILED_NOTES[call.name], {"error": failed.reason}, "warning")]
        if kind is Failure.PENALTY_BOX:
            wait = failed.retry_after_s or 0.0
            self._penalty_until = now + wait
            self.counters.penalty_box_until = at + timedelta(seconds=wait)
            events.append(Degraded(failed.reason))
        if call.name == "tickle":
            self._tickle_at = now + wait + settings.tickle_s
        elif call.name == "positions":
            self._refresh_at = now + wait + settings.positions_refresh_s
        elif call.name == "secdef":  # the waiting trades go out without their keys
            events += self._learn(call, {})
        return events

    def _rest_ok(self, now: float) -> list[Event]:
        """A call succeeded: a penalty box that degraded the link is over (unless this
        call was answered before a concurrent one drew the 429)."""
        if now < self._penalty_until or self.counters.penalty_box_until is None:
            return []
        self.counters.penalty_box_until = None
        return [Recovered(), Note("ibkr_penalty_box_over")] if self.ready else []

    def _fail(self, reason: str, now: float) -> LinkFailed:
        """The link is over; inside a penalty box the next one waits for its end."""
        left = self._penalty_until - now
        return LinkFailed(reason, wait_s=left if left > 0 else None)


_GREEK = (p.DELTA,)
_PRICES = (p.LAST, p.BID, p.ASK, p.MARK)


def _carries(fields: Mapping[str, str], ids: tuple[str, ...]) -> bool:
    """Whether an update itself carried a value (not a clear) for one of these fields."""
    for field_id in ids:
        value = fields.get(field_id)
        if value is not None and value.strip() not in p.CLEARED:
            return True
    return False


_FAILURE_KINDS = frozenset(f.value for f in Failure)
_FAILED_NOTES = {
    "tickle": "ibkr_tickle_skipped",
    "positions": "ibkr_positions_refresh_failed",
    "trades": "ibkr_trades_backfill_failed",
    "secdef": "ibkr_secdef_failed",
}


def replay_connection(link: Mapping[str, Any]) -> IbkrConnection:
    """The Connection a recording's `link` record describes: its `max_lines` (recorded
    since links carry it; the default before) plans the same lines as the live link."""
    return IbkrConnection(
        settings=LinkSettings(max_lines=int(link.get("max_lines", DEFAULT_MAX_LINES)))
    )
