"""`greeksd probe ibkr`: one bounded, linear session that answers "do Greeks arrive, for
which contracts, how fast, and if not, why" — the question the original implementation
could not answer when it connected fine and never received a Greek.

The REST steps are the probe's own diagnostics (auth status, the market-data snapshot
preflight); then the link runner runs one link with the stream's own `IbkrConnection`,
which the probe only watches (greeksd.brokers.probe_link), so what the probe sees is
what the stream would do, REST calls included (the trades backfill at once; tickle and
positions refresh a minute in, if the probe lasts that long).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.client import IbkrClient
from greeksd.brokers.ibkr.connection import IbkrConnection, IbkrCounters, LinkSettings
from greeksd.brokers.ibkr.gateway import GatewayClient, GatewayError
from greeksd.brokers.ibkr.session import COMPETING
from greeksd.brokers.ibkr.spec import IbkrSettings
from greeksd.brokers.link import TRANSPORT_ERRORS, Event, LinkUp, Note
from greeksd.brokers.probe_link import Observed, probe_link
from greeksd.brokers.probe_report import contracts_covered, finish_report
from greeksd.model import Snapshot, Trade

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
    conn = IbkrConnection()  # nothing planned, nothing seen: what a failed session leaves
    gw = GatewayClient(url, ca_file=ca_file, verify_tls=verify_tls, min_interval=rest_min_interval)
    async with IbkrClient(gw, LinkSettings(max_lines=max_lines)) as client:
        try:
            conn = await _session(client, found, duration_s, elapsed_ms) or conn
        except (GatewayError, *TRANSPORT_ERRORS) as exc:
            found.summary["error"] = f"{type(exc).__name__}: {exc}"
            found.hints.append(f"gateway session failed: {exc}")
    rows = _coverage(conn, found)
    covered = contracts_covered(rows)
    quality = [str(row["market_data"] or "unknown") for row in rows]
    found.summary |= {
        "contracts": len(rows),
        "contracts_with_greeks": covered,
        "market_data_messages": conn.market_frames,
        "market_data": {k: quality.count(k) for k in (p.LIVE, p.DELAYED, p.FROZEN, "unknown")},
        # the service's definitions (greeksd.coverage), from what each update carried
        "coverage": conn.coverage.summary(datetime.now(UTC)),
    }
    if covered == 0:
        found.hints += _zero_coverage_hints(conn, found)
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
    client: IbkrClient,
    found: _Findings,
    duration_s: float,
    elapsed_ms: Callable[[], float],
) -> IbkrConnection | None:
    """The REST diagnostics, then the websocket for `duration_s`; None when the gateway's
    session is unusable (the hint says why)."""
    summary, gw = found.summary, client.gw
    auth = await gw.auth_status()
    tickle = await gw.tickle()
    summary |= {"authenticated": auth.authenticated, "competing": auth.competing}
    problem = auth.problem or tickle.problem
    if problem:
        advice = (
            "log out of the other login (TWS, the mobile app, another gateway) or log in "
            "here again to take the session over"
            if problem == COMPETING
            else f"log in to the gateway in a browser at {gw.url} (sessions also reset "
            "daily around 01:00)"
        )
        found.hints.append(f"{problem}: {advice}")
        return None
    summary["iserver_accounts"] = await gw.iserver_accounts()
    conn = client.connection(tickle.session, await gw.option_positions(), IbkrCounters())
    summary["left_out"] = [str(o.contract.key) for o in conn.plan.left_out]
    conids = [o.conid for o in conn.plan.options]
    if conids:  # the first call only "preflights"; the second shows values and 6509
        fields = [*p.OPTION_FIELDS, p.AVAILABILITY]
        await gw.snapshot(conids, fields)
        await trio.sleep(1.0)
        second = await gw.snapshot(conids, fields)
        summary["preflight"] = {
            str(r.get("conid")): {k: v for k, v in r.items() if k[0].isdigit()} for r in second
        }
    listening = trio.CancelScope()
    target = client.target(tickle.session, conn)
    watched = Observed(
        conn,
        partial(_notice, conn, found, elapsed_ms),
        summary,
        elapsed_ms,
        listening,
        duration_s,
        connect_timeout=target.connect_timeout,
    )
    target = replace(target, connection=watched)
    failure = await probe_link("ibkr", client, target, listening, _NO_ROWS)
    if failure is not None:
        found.hints.append(f"websocket status: {failure.reason}")
    if conn.session_state.authenticated is not None:
        summary["sts_authenticated"] = conn.session_state.authenticated
    return conn


def _notice(
    conn: IbkrConnection, found: _Findings, elapsed_ms: Callable[[], float], events: list[Event]
) -> None:
    """What the Connection decided, noted for the report: when it subscribed, each
    option's first Greek, the gateway's errors."""
    summary = found.summary
    conids = {o.contract.key_text: o.conid for o in conn.plan.options}
    for event in events:
        if isinstance(event, Snapshot):
            conid = conids.get(event.contract_key)
            if conid is None or conid in found.first_greeks_ms:
                continue
            merged = conn.book.fields(conid)
            if any(f in merged for f in COVERAGE.values()):
                found.first_greeks_ms[conid] = elapsed_ms()
        elif isinstance(event, LinkUp):
            summary["subscribed_ms"] = elapsed_ms()
        elif isinstance(event, Note) and event.event == "ibkr_gateway_error":
            summary.setdefault("gateway_errors", []).append(event.fields["message"])


class _NoRows:
    """The probe's sink: its report comes from the Connection's book, not from rows."""

    def put(self, snapshot: Snapshot) -> None:
        pass

    def put_trade(self, trade: Trade) -> None:
        pass


_NO_ROWS = _NoRows()


def _coverage(conn: IbkrConnection, found: _Findings) -> list[dict[str, Any]]:
    rows = []
    for option in conn.plan.options:
        merged = conn.book.fields(option.conid)
        row: dict[str, Any] = {
            "contract_key": str(option.contract.key),
            "conid": option.conid,
            "availability": merged.get(p.AVAILABILITY, ""),
            "market_data": conn.book.market_data(option.conid),
        }
        row |= {name: p.parse_value(merged.get(fid)) is not None for name, fid in COVERAGE.items()}
        row["first_greeks_ms"] = found.first_greeks_ms.get(option.conid)
        rows.append(row)
    return rows


def _zero_coverage_hints(conn: IbkrConnection, found: _Findings) -> list[str]:
    summary, plan = found.summary, conn.plan
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
    if conn.market_frames == 0:
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
