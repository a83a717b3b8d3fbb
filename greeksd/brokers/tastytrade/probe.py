"""`greeksd probe tastytrade`: one bounded, linear DXLink session that answers "do Greeks
arrive, for which contracts, how fast, and if not, why" — the same report as the IBKR
probe, so both brokers can be diagnosed the same way.

The session is the stream's own: `TastytradeClient` does the REST steps (timed one by
one here), and the link runner runs one link with the same `DxlinkConnection`, which
the probe only watches (greeksd.brokers.probe_link): no handshake or decoding of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from greeksd.brokers.link import Event, LinkFailed, LinkUp, Note, Rejected
from greeksd.brokers.probe_link import Observed, probe_link
from greeksd.brokers.probe_report import COVERAGE, contracts_covered, finish_report
from greeksd.brokers.tastytrade.connection import DxlinkConnection, DxlinkOptions
from greeksd.brokers.tastytrade.protocol import Positions
from greeksd.brokers.tastytrade.session import (
    QuoteToken,
    TastytradeApi,
    TastytradeApiError,
    TastytradeAuthError,
)
from greeksd.brokers.tastytrade.spec import TastytradeSettings
from greeksd.brokers.tastytrade.stream import TastytradeClient
from greeksd.model import Snapshot, Trade


@dataclass
class _Findings:
    summary: dict[str, Any] = field(default_factory=dict)
    hints: list[str] = field(default_factory=list)
    first_greeks_ms: dict[str, float] = field(default_factory=dict)
    present: dict[str, set[str]] = field(default_factory=dict)
    feed_frames: int = 0
    greeks_events: int = 0
    rejected: int = 0


async def probe_tastytrade(
    api: TastytradeApi, *, duration_s: float = 30.0, out_dir: Path = Path(".")
) -> int:
    """Write `tastytrade-probe.json` and `tastytrade-probe-coverage.csv` into `out_dir`;
    0 when at least one contract received a Greek, else 1 with hints naming the cause."""
    start = trio.current_time()

    def elapsed_ms() -> float:
        return round((trio.current_time() - start) * 1000, 1)

    found = _Findings(
        summary={"started_at": datetime.now(UTC).isoformat(), "duration_s": duration_s}
    )
    positions = Positions([])
    client = TastytradeClient(api, DxlinkOptions())
    try:
        async with client.open():
            positions = await client.positions()
            found.summary |= {
                "positions_ms": elapsed_ms(),
                "unsupported_positions": sum(positions.unsupported.values()),
                "unsupported_reasons": dict(positions.unsupported),
            }
            if positions.contracts:
                token = await client.quote_token()
                found.summary |= {"quote_token_ms": elapsed_ms(), "dxlink_url": token.dxlink_url}
                await _session(client, token, positions, found, duration_s, elapsed_ms)
    except TastytradeAuthError as exc:
        found.summary["error"] = str(exc)
        found.hints.append(str(exc))
    except TastytradeApiError as exc:
        found.summary["error"] = f"{type(exc).__name__}: {exc}"
        found.hints.append(f"session failed: {exc}")
    rows = _coverage(positions, found)
    covered = contracts_covered(rows)
    found.summary |= {
        "contracts": len(rows),
        "contracts_with_greeks": covered,
        "feed_frames": found.feed_frames,
        "greeks_events": found.greeks_events,
        "rejected": found.rejected,
    }
    if covered == 0:
        found.hints += _zero_coverage_hints(positions, found)
    return finish_report(
        out_dir, "tastytrade", found.summary, found.hints, rows, ("contract_key", "streamer_symbol")
    )


async def _session(
    client: TastytradeClient,
    token: QuoteToken,
    positions: Positions,
    found: _Findings,
    duration_s: float,
    elapsed_ms: Callable[[], float],
) -> None:
    """One link through the link runner, for `duration_s` once it is open (or until it
    fails), with the stream's own Connection under watch."""
    listening = trio.CancelScope()
    conn = client.connection(token, positions)
    watched = Observed(
        conn,
        partial(_notice, conn, found, elapsed_ms),
        found.summary,
        elapsed_ms,
        listening,
        duration_s,
        connect_timeout=conn.options.handshake_timeout,
    )
    target = client.link_target(token, watched)
    failure = await probe_link(
        "tastytrade", client, target, listening, _Coverage(found, elapsed_ms)
    )
    if failure is not None and not failure.fresh_credentials:  # a refused token: auth_state
        found.summary["error"] = failure.reason
        found.hints.append(f"session failed: {failure.reason}")
    found.feed_frames = conn.feed_frames
    # the service's definitions (greeksd.coverage), from the Greeks events that arrived
    found.summary["coverage"] = conn.coverage.summary(datetime.now(UTC))


def _notice(
    conn: DxlinkConnection, found: _Findings, elapsed_ms: Callable[[], float], events: list[Event]
) -> None:
    """What the Connection decided, noted for the report."""
    summary = found.summary
    for event in events:
        if isinstance(event, Rejected):
            found.rejected += 1
        elif isinstance(event, LinkUp):
            summary |= {"auth_state": "AUTHORIZED", "authorized_ms": elapsed_ms()}
        elif isinstance(event, LinkFailed) and event.fresh_credentials:
            summary["auth_state"] = "UNAUTHORIZED"
        elif isinstance(event, Note) and event.event == "dxlink_error":
            text = f"{event.fields['error']}: {event.fields['message']}"
            summary.setdefault("server_errors", []).append(text)
    if conn.handshake.auth_sent:
        summary["auth_sent"] = True
    if conn.subscribed and "subscribed_ms" not in summary:
        summary["subscribed_ms"] = elapsed_ms()
    if conn.feed_config_fields is not None:
        summary["feed_config_has_fields"] = conn.feed_config_fields


class _Coverage:
    """The rows of the link, as coverage: which Greeks arrived for which contract."""

    def __init__(self, found: _Findings, elapsed_ms: Callable[[], float]) -> None:
        self.found = found
        self.elapsed_ms = elapsed_ms
        self.last_event: Any = None

    def put(self, row: Snapshot) -> None:
        found = self.found
        if row.source_payload is not self.last_event:  # one event, a row per account
            self.last_event = row.source_payload
            found.greeks_events += 1
        present = found.present.setdefault(row.contract_key, set())
        present.update(name for name in COVERAGE if getattr(row, name) is not None)
        if present and row.contract_key not in found.first_greeks_ms:
            found.first_greeks_ms[row.contract_key] = self.elapsed_ms()

    def put_trade(self, trade: Trade) -> None:
        pass


def _coverage(positions: Positions, found: _Findings) -> list[dict[str, Any]]:
    rows = []
    for contract in positions.contracts:
        key = str(contract.key)
        present = found.present.get(key, set())
        row: dict[str, Any] = {
            "contract_key": key,
            "streamer_symbol": positions.streamer_symbol(contract.key),
        }
        row |= {name: name in present for name in COVERAGE}
        row["first_greeks_ms"] = found.first_greeks_ms.get(key)
        rows.append(row)
    return rows


def _zero_coverage_hints(positions: Positions, found: _Findings) -> list[str]:
    summary = found.summary
    if found.hints:
        return []
    if not positions.contracts:
        unsupported = ", ".join(f"{n} {why}" for why, n in positions.unsupported.items())
        extra = f" (held but not streamed: {unsupported})" if unsupported else ""
        return ["no open option positions in the account(s)" + extra]
    if summary.get("auth_state") == "UNAUTHORIZED":
        return [
            "DXLink refused the quote token: the account may lack market-data access "
            "(GET /api-quote-tokens level) or the token expired"
        ]
    if summary.get("auth_state") != "AUTHORIZED":
        return [
            "DXLink never authorized the session: AUTH sent before the server's "
            "AUTH_STATE UNAUTHORIZED, a proxy dropping frames, or the URL is wrong"
        ]
    if found.feed_frames == 0:
        return [
            "authorized but no FEED_DATA arrived: the subscription was not accepted "
            "(check server_errors) or the feed is idle outside market hours"
        ]
    if found.greeks_events == 0:
        return [
            "FEED_DATA arrived but no Greeks for the held symbols: the streamer symbols "
            "(see the CSV) may not match dxFeed's (root vs underlying, strike format)"
        ]
    return [
        "Greeks events arrived but every Greek was NaN/null: market closed or no "
        "options market-data entitlement"
    ]


async def run_tastytrade_probe(
    settings: TastytradeSettings, *, duration_s: float, out_dir: Path
) -> int:
    """Entry point for `greeksd probe tastytrade`."""
    api = TastytradeApi(
        settings.secret,
        settings.refresh,
        account=settings.account,
        api_url=settings.api_url,
    )
    return await probe_tastytrade(api, duration_s=duration_s, out_dir=out_dir)
