"""`greeksd probe tastytrade`: one bounded, linear DXLink session that answers "do Greeks
arrive, for which contracts, how fast, and if not, why" — the same report as the IBKR
probe, so both brokers can be diagnosed the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection
from trio_websocket import open_websocket_url as _open_websocket_url

from greeksd.brokers.probe_report import COVERAGE, contracts_covered, finish_report
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.brokers.tastytrade.session import (
    Positions,
    TastytradeApi,
    TastytradeApiError,
    TastytradeAuthError,
)
from greeksd.brokers.tastytrade.spec import TastytradeSettings
from greeksd.brokers.tastytrade.stream import MAX_MESSAGE_SIZE
from greeksd.logs import get_logger

log = get_logger("greeksd.tastytrade.probe")

_WIRE = {
    "delta": "delta",
    "gamma": "gamma",
    "theta": "theta",
    "vega": "vega",
    "implied_volatility": "volatility",
}
_CHANNEL = 1


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
    try:
        async with api.open():
            positions = await api.positions()
            found.summary |= {
                "positions_ms": elapsed_ms(),
                "skipped_future_options": positions.skipped_future_options,
            }
            if positions.contracts:
                token = await api.quote_token()
                found.summary |= {"quote_token_ms": elapsed_ms(), "dxlink_url": token.dxlink_url}
                await _session(
                    token.dxlink_url, token.token, positions, found, duration_s, elapsed_ms
                )
    except TastytradeAuthError as exc:
        found.summary["error"] = str(exc)
        found.hints.append(str(exc))
    except (TastytradeApiError, HandshakeError, ConnectionClosed, OSError) as exc:
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
    url: str,
    token: str,
    positions: Positions,
    found: _Findings,
    duration_s: float,
    elapsed_ms: Callable[[], float],
) -> None:
    summary = found.summary
    connect_started = elapsed_ms()
    async with _open_websocket_url(url, max_message_size=MAX_MESSAGE_SIZE) as ws:
        summary["connect_ms"] = round(elapsed_ms() - connect_started, 1)
        await _send(ws, dx.Setup(60, 60, dx.CLIENT_VERSION))
        with trio.move_on_after(duration_s):
            await _listen(ws, token, positions, found, elapsed_ms)


async def _send(ws: WebSocketConnection, message: dx.Outgoing) -> None:
    await ws.send_message(dx.build(message))


async def _listen(
    ws: WebSocketConnection,
    token: str,
    positions: Positions,
    found: _Findings,
    elapsed_ms: Callable[[], float],
) -> None:
    summary = found.summary
    symbols = {dx.streamer_symbol(c.key): str(c.key) for c in positions.contracts}
    layouts = dx.field_layouts(dx.ACCEPT_EVENT_FIELDS, None)
    next_keepalive = trio.current_time() + 30
    setup = unauthorized = False
    while True:
        with trio.move_on_at(next_keepalive) as idle:
            message = dx.parse(await ws.get_message())
        if idle.cancelled_caught:
            await _send(ws, dx.Keepalive())
            next_keepalive = trio.current_time() + 30
            continue
        summary.setdefault("first_message_ms", elapsed_ms())
        match message:
            case dx.Setup():
                setup = True
            case dx.AuthState(state="UNAUTHORIZED"):
                if summary.get("auth_sent"):
                    summary["auth_state"] = "UNAUTHORIZED"
                    return
                unauthorized = True
            case dx.AuthState(state="AUTHORIZED"):
                summary |= {"auth_state": "AUTHORIZED", "authorized_ms": elapsed_ms()}
                await _send(ws, dx.ChannelRequest(_CHANNEL))
            case dx.ChannelOpened(channel=channel):
                await _send(ws, dx.FeedSetup(channel, dx.ACCEPT_EVENT_FIELDS))
                underlyings = {c.underlying for c in positions.contracts}
                add = [("Greeks", s) for s in symbols] + [("Quote", u) for u in underlyings]
                for chunk in dx.chunk_subscription(channel, add=add, reset=True):
                    await _send(ws, chunk)
                summary["subscribed_ms"] = elapsed_ms()
            case dx.FeedConfig():
                layouts = dx.merge_feed_config(layouts, message)
                summary["feed_config_has_fields"] = message.event_fields is not None
            case dx.FeedData(data=data):
                found.feed_frames += 1
                events, problems = dx.decode_feed_data(data, layouts)
                found.rejected += len(problems)
                _note_greeks(events, symbols, found, elapsed_ms)
            case dx.Error(error=error, message=text):
                summary.setdefault("server_errors", []).append(f"{error}: {text}")
            case dx.Malformed():
                found.rejected += 1
        if setup and unauthorized and not summary.get("auth_sent"):
            await _send(ws, dx.Auth(token))
            summary["auth_sent"] = True


def _note_greeks(
    events: list[dx.FeedEvent],
    symbols: dict[str, str],
    found: _Findings,
    elapsed_ms: Callable[[], float],
) -> None:
    for event in events:
        key = symbols.get(event["eventSymbol"]) if event["eventType"] == "Greeks" else None
        if key is None or dx.is_removal(event):
            continue
        found.greeks_events += 1
        present = found.present.setdefault(key, set())
        for name, wire in _WIRE.items():
            if isinstance(event.get(wire), int | float) and not isinstance(event[wire], bool):
                present.add(name)
        if present and key not in found.first_greeks_ms:
            found.first_greeks_ms[key] = elapsed_ms()


def _coverage(positions: Positions, found: _Findings) -> list[dict[str, Any]]:
    rows = []
    for contract in positions.contracts:
        key = str(contract.key)
        present = found.present.get(key, set())
        row: dict[str, Any] = {
            "contract_key": key,
            "streamer_symbol": dx.streamer_symbol(contract.key),
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
        extra = (
            f" ({positions.skipped_future_options} futures options are not recorded)"
            if positions.skipped_future_options
            else ""
        )
        return ["no open equity/index option positions in the account(s)" + extra]
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
