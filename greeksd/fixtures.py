"""The mixed IBKR + Tastytrade fixture: both simulators on one book, recorded by the real
streams, with every awkward case a replay must reproduce injected on a schedule.

    python -m greeksd.fixtures --out tests/fixtures/mixed-session.jsonl.gz

(`just fixtures`). The markets are seeded, so values repeat run to run; times and the
exact interleaving of the two brokers do not, which is fine: tests check that replay
reproduces what the live run stored, not a frozen file.

Schedule, as fractions of the duration: malformed frames (both), an IBKR partial update
with explicit clears, DXLink Greeks with NaN/Infinity, duplicate frames (both), late
events (both), a position opened, every connection dropped (reconnect), a position
closed. Positions are refreshed every `refresh_s`, so opened/closed ones show up.

It lives outside `greeksd.sim` because it runs greeksd's clients against the simulators;
the simulators themselves never import the clients (tests/test_sim_independence.py). The
frames it injects are built by the simulators, as a server would send them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.logs import configure_logging, get_logger
from greeksd.model import (
    ContractKey,
    OptionRight,
    Recorder,
    SnapshotSink,
    Source,
    StreamStatus,
)
from greeksd.recording import record_session
from greeksd.sim import ibkr_wire as ib
from greeksd.sim.dxlink_server import greeks_event
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import SimContract, showcase_book
from greeksd.sim.readiness import wait_subscribed
from greeksd.sim.symbols import streamer_symbol
from greeksd.sim.tastytrade_api import TastytradeSim, open_tastytrade_sim

log = get_logger("greeksd.fixtures")

DEFAULT_OUT = Path("tests/fixtures/mixed-session.jsonl.gz")


TYPICAL_GREEKS: dict[str, Any] = {
    "price": 4.2,
    "volatility": 0.27,
    "delta": 0.41,
    "gamma": 0.012,
    "theta": -0.05,
    "rho": 0.08,
    "vega": 0.19,
}


def _greeks(symbol: str, time_ms: int, **values: Any) -> dict[str, Any]:
    """One Greeks event with typical values, `values` overriding some."""
    return greeks_event(symbol, time_ms, **(TYPICAL_GREEKS | values))


async def inject_faults(
    ib_sim: IbkrGatewaySim,
    tt_sim: TastytradeSim,
    book: Sequence[SimContract],
    duration_s: float,
) -> None:
    """The schedule above, over the time left once both streams are subscribed (a
    fault injected before that would miss its client on a slow machine); returns when
    done, before `duration_s`."""
    began = trio.current_time()
    conid0, conid1 = ib_sim.conid_of(book[0].key), ib_sim.conid_of(book[1].key)
    symbol0 = streamer_symbol(book[0].key)
    await wait_subscribed([ib_sim, tt_sim], {book[0].key, book[1].key})
    start = trio.current_time()
    span = duration_s - (start - began)

    async def at(fraction: float, what: str) -> None:
        await trio.sleep_until(start + fraction * span)
        log.info("fixture_fault", fault=what)

    await at(0.15, "malformed")
    ib_sim.send_malformed()
    await tt_sim.send_malformed()

    await at(0.2, "partial_update_and_clears")
    ib_sim.push(conid0, {ib.DELTA: "", ib.GAMMA: "N/A", ib.BID: "1.23"})

    await at(0.25, "nan_greeks")
    now_ms = int(time.time() * 1000)
    await tt_sim.dxlink.inject_greeks(
        _greeks(symbol0, now_ms, delta="NaN", vega="Infinity", rho="NaN")
    )

    await at(0.3, "duplicates")
    duplicate = _greeks(symbol0, int(time.time() * 1000), delta=0.4242)
    await tt_sim.dxlink.inject_greeks(duplicate, times=2)
    ib_frame = ib.market_data(conid1, {ib.DELTA: "-0.3131"}, int(time.time() * 1000))
    ib_sim.send_frame(ib_frame)
    ib_sim.send_frame(ib_frame)

    await at(0.35, "out_of_order")
    late_ms = int(time.time() * 1000) - 5000
    await tt_sim.dxlink.inject_greeks(_greeks(symbol0, late_ms, delta=0.3999))
    ib_sim.send_frame(ib.market_data(conid1, {ib.DELTA: "-0.2929"}, late_ms))

    await at(0.4, "position_opened")
    expiry = book[0].key.expiration + timedelta(days=28)
    opened = SimContract(
        ContractKey("AAPL", expiry, OptionRight.CALL, Decimal(200)),
        "AAPL",
        Decimal(100),
        Decimal(2),
    )
    ib_sim.open_position(opened)
    tt_sim.open_position(opened)

    await at(0.55, "reconnect")
    ib_sim.drop_connections()
    await tt_sim.drop()

    await at(0.75, "position_closed")
    ib_sim.close_position(book[2].key)
    tt_sim.close_position(book[2].key)


async def record_mixed_session(
    out: Path,
    *,
    duration_s: float = 24.0,
    sink: SnapshotSink | None = None,
    refresh_s: float = 1.0,
    ibkr_tick_s: float = 0.02,
    dxlink_tick_s: float = 0.05,
) -> tuple[dict[str, int], dict[str, StreamStatus]]:
    """Run both simulators and both real streams for `duration_s`, recording to `out`
    (and putting rows into `sink`, e.g. a live pipeline, when given)."""
    book = showcase_book(datetime.now(UTC).date())
    async with (
        open_ibkr_sim(book, tick_interval=ibkr_tick_s) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=dxlink_tick_s) as tt_sim,
    ):

        def streams(recorder: Recorder) -> list[Source]:
            ibkr = IbkrStream(
                ib_sim.url,
                rest_min_interval=0.0,
                positions_refresh_s=refresh_s,
                backoff=Backoff(initial=0.2, maximum=1.0),
                recorder=recorder,
            )
            api = TastytradeApi(tt_sim.secret, tt_sim.refresh_token, api_url=tt_sim.api_url)
            tasty = TastytradeStream(
                api,
                positions_refresh_s=refresh_s,
                backoff=Backoff(initial=0.2, maximum=1.0),
                recorder=recorder,
            )
            return [ibkr, tasty]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(inject_faults, ib_sim, tt_sim, book, duration_s)
            result = await record_session(
                streams, out, ["ibkr", "tastytrade"], duration_s=duration_s, sink=sink
            )
            nursery.cancel_scope.cancel()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture file to write")
    parser.add_argument("--duration", type=float, default=24.0, help="seconds to record")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    counts, statuses = trio.run(lambda: record_mixed_session(args.out, duration_s=args.duration))
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KiB): {counts}")
    for name, status in statuses.items():
        print(
            f"  {name}: ticks={status.ticks} rejected_frames={status.rejected_frames} "
            f"reconnects={status.reconnects}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
