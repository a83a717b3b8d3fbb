"""`greeksd probe ibkr`: one bounded, linear session that answers "do Greeks arrive, for
which contracts, how fast, and if not, why" — the question the original implementation
could not answer when it connected fine and never received a Greek.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from greeksd.brokers.ibkr import connection as c
from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.gateway import GatewayClient
from greeksd.brokers.ibkr.spec import IbkrSettings
from greeksd.brokers.ibkr.stream import LINK_ERRORS, LinePlan, load_option_positions, open_socket
from greeksd.brokers.probe_report import contracts_covered, finish_report
from greeksd.logs import get_logger

log = get_logger("greeksd.ibkr.probe")

COVERAGE = {
    "delta": p.DELTA,
    "gamma": p.GAMMA,
    "theta": p.THETA,
    "vega": p.VEGA,
    "implied_volatility": p.IV,
}
AVAILABILITY = {
    "R": "realtime",
    "D": "delayed",
    "Z": "frozen",
    "Y": "frozen delayed",
    "N": "not subscribed",
}


@dataclass
class _Findings:
    summary: dict[str, Any] = field(default_factory=dict)
    hints: list[str] = field(default_factory=list)
    first_greeks_ms: dict[int, float] = field(default_factory=dict)
    market_messages: int = 0


async def probe_ibkr(
    url: str,
    *,
    duration_s: float = 30.0,
    out_dir: Path = Path("."),
    ca_file: Path | None = None,
    verify_tls: bool = False,
    max_lines: int = 100,
    rest_min_interval: float = 0.1,
) -> int:
    """Write `ibkr-probe.json` and `ibkr-probe-coverage.csv` into `out_dir`; 0 when at
    least one contract received a Greek, else 1 with hints naming the likely cause."""
    start = trio.current_time()

    def elapsed_ms() -> float:
        return round((trio.current_time() - start) * 1000, 1)

    found = _Findings(
        summary={
            "url": url,
            "started_at": datetime.now(UTC).isoformat(),
            "duration_s": duration_s,
            "max_lines": max_lines,
        }
    )
    book = p.MarketDataBook()
    plan = LinePlan([], [], [])
    async with GatewayClient(
        url, ca_file=ca_file, verify_tls=verify_tls, min_interval=rest_min_interval
    ) as gw:
        try:
            plan = await _session(gw, found, book, duration_s, max_lines, elapsed_ms)
        except LINK_ERRORS as exc:
            found.summary["error"] = f"{type(exc).__name__}: {exc}"
            found.hints.append(f"gateway session failed: {exc}")
    rows = _coverage(plan, book, found)
    covered = contracts_covered(rows)
    quality = [str(row["market_data"] or "unknown") for row in rows]
    found.summary |= {
        "contracts": len(rows),
        "contracts_with_greeks": covered,
        "market_data_messages": found.market_messages,
        "market_data": {k: quality.count(k) for k in (p.LIVE, p.DELAYED, p.FROZEN, "unknown")},
    }
    if covered == 0:
        found.hints += _zero_coverage_hints(plan, found)
    not_live = [q for q in quality if q in (p.DELAYED, p.FROZEN)]
    if not_live:
        found.hints.append(
            f"{len(not_live)} contract(s) get delayed or frozen market data (field 6509): "
            "their rows are flagged market_data='delayed'/'frozen', not live; check the "
            "account's market-data subscriptions (frozen also means the market is closed)"
        )
    columns = ("contract_key", "conid", "availability", "market_data")
    return finish_report(out_dir, "ibkr", found.summary, found.hints, rows, columns)


async def _session(
    gw: GatewayClient,
    found: _Findings,
    book: p.MarketDataBook,
    duration_s: float,
    max_lines: int,
    elapsed_ms: Callable[[], float],
) -> LinePlan:
    summary = found.summary
    auth = await gw.auth_status()
    tickle = await gw.tickle()
    summary |= {"authenticated": auth.authenticated, "competing": auth.competing}
    problem = auth.problem or tickle.problem
    if problem:
        advice = (
            "log out of the other login (TWS, the mobile app, another gateway) or log in "
            "here again to take the session over"
            if problem == c.COMPETING
            else f"log in to the gateway in a browser at {gw.url} (sessions also reset "
            "daily around 01:00)"
        )
        found.hints.append(f"{problem}: {advice}")
        return LinePlan([], [], [])
    summary["iserver_accounts"] = await gw.iserver_accounts()
    plan = LinePlan.build(await load_option_positions(gw), max_lines)
    summary["left_out"] = [str(o.contract.key) for o in plan.left_out]
    conids = [o.conid for o in plan.options]
    if conids:  # the first call only "preflights"; the second shows values and 6509
        fields = [*p.OPTION_FIELDS, p.AVAILABILITY]
        await gw.snapshot(conids, fields)
        await trio.sleep(1.0)
        second = await gw.snapshot(conids, fields)
        summary["preflight"] = {
            str(r.get("conid")): {k: v for k, v in r.items() if k[0].isdigit()} for r in second
        }
    connect_started = elapsed_ms()
    async with open_socket(gw, tickle.session) as ws:
        summary["connect_ms"] = round(elapsed_ms() - connect_started, 1)
        for option in plan.options:
            book.track(option)
        with trio.move_on_after(duration_s):
            await _listen(ws, found, book, plan, elapsed_ms)
    return plan


async def _listen(
    ws: Any,
    found: _Findings,
    book: p.MarketDataBook,
    plan: LinePlan,
    elapsed_ms: Callable[[], float],
) -> None:
    summary = found.summary
    options = {o.conid for o in plan.options}
    session = c.SessionState()  # sts may come split in partial frames
    while True:
        event = p.parse_frame(await ws.get_message())
        summary.setdefault("first_message_ms", elapsed_ms())
        if isinstance(event, p.AuthStatus):
            verdict = session.update(event)
            summary["sts_authenticated"] = session.authenticated
            if isinstance(verdict, c.Lost):
                found.hints.append(f"websocket status: {verdict.reason}")
                return
            if isinstance(verdict, c.Ready) and "subscribed_ms" not in summary:
                for conid, fields in plan.wanted().items():
                    await ws.send_message(p.smd_command(conid, fields))
                summary["subscribed_ms"] = elapsed_ms()
        elif isinstance(event, p.MarketData):
            found.market_messages += 1
            book.apply(event, datetime.now(UTC))
            merged = book.fields(event.conid)
            if (
                event.conid in options
                and event.conid not in found.first_greeks_ms
                and any(f in merged for f in COVERAGE.values())
            ):
                found.first_greeks_ms[event.conid] = elapsed_ms()
        elif isinstance(event, p.GatewayErrorMessage):
            summary.setdefault("gateway_errors", []).append(event.message)


def _coverage(plan: LinePlan, book: p.MarketDataBook, found: _Findings) -> list[dict[str, Any]]:
    rows = []
    for option in plan.options:
        merged = book.fields(option.conid)
        row: dict[str, Any] = {
            "contract_key": str(option.contract.key),
            "conid": option.conid,
            "availability": merged.get(p.AVAILABILITY, ""),
            "market_data": book.market_data(option.conid),
        }
        row |= {name: p.parse_value(merged.get(fid)) is not None for name, fid in COVERAGE.items()}
        row["first_greeks_ms"] = found.first_greeks_ms.get(option.conid)
        rows.append(row)
    return rows


def _zero_coverage_hints(plan: LinePlan, found: _Findings) -> list[str]:
    summary = found.summary
    if found.hints:
        return []
    if not plan.options and not plan.left_out:
        return ["no option positions found in /portfolio/{account}/positions"]
    if not plan.options:
        return [f"every option was left out by the lines limit ({summary['max_lines']})"]
    hints = []
    if not summary.get("sts_authenticated"):
        hints.append("the websocket never reported sts authenticated:true (cookie/session)")
    codes = {str(v.get(p.AVAILABILITY, ""))[:1] for v in summary.get("preflight", {}).values()}
    bad = sorted(c for c in codes if c not in {"R", "D", ""})
    if bad:
        hints.append(
            "market-data availability (6509) is "
            + ", ".join(AVAILABILITY.get(c, c) for c in bad)
            + ": check the account's market-data subscriptions (need R or D)"
        )
    if found.market_messages == 0:
        hints.append(
            "no smd market data arrived: /iserver/accounts not called, wrong smd "
            "format, or the account's concurrent market-data lines limit is used up"
        )
    else:
        hints.append(
            "market data arrived but no Greeks: market closed or no option "
            "entitlement (Greeks 7308-7311/7633 are absent outside trading hours)"
        )
    return hints


async def run_ibkr_probe(settings: IbkrSettings, *, duration_s: float, out_dir: Path) -> int:
    """Entry point for `greeksd probe ibkr`."""
    return await probe_ibkr(
        settings.url,
        duration_s=duration_s,
        out_dir=out_dir,
        ca_file=settings.ca_file,
        verify_tls=settings.verify_tls,
        max_lines=settings.max_lines,
    )
