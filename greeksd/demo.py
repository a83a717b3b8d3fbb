"""`greeksd demo`: both broker simulators, the database and the whole service, in one
process tree.

The simulators hold the same book and run in the same nursery as the service; the
service's streams are the real `IbkrStream` and `TastytradeStream`, built from settings
that point at the simulators, so the demo exercises exactly what `greeksd run` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import trio

from greeksd.config import Settings
from greeksd.model import Source
from greeksd.service import RunningService, run_until_signal
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim

BOOK_SIZE = 10
# ~10 option updates/s from IBKR (one contract per tick) and ~15/s from DXLink (three
# events per frame): a lively page, nowhere near what the writer can take.
IBKR_TICK_S = 0.1
DXLINK_TICK_S = 0.2


def status_line(service: RunningService) -> str:
    status = service.state.status_json()
    streams = " ".join(
        f"{name}={s['state']}(ticks={s['ticks']})" for name, s in status["streams"].items()
    )
    writer = status["writer"]
    p95 = writer["latency_ms"]["p95"]
    return (
        f"{streams} rows={writer['rows_written']} queue={writer['queue_depth']} "
        f"p95_ms={'-' if p95 is None else f'{p95:.1f}'}"
    )


async def run_demo(
    settings: Settings,
    build_sources: Callable[[Settings], list[Source]],
    *,
    duration_s: float = 0.0,
    status_every_s: float = 5.0,
) -> int:
    """Serve the demo until Ctrl-C or for `duration_s` (0 = no limit); `build_sources`
    is the CLI's settings -> sources function, so the demo wires streams like `run`."""
    book = default_contracts(datetime.now(UTC).date(), BOOK_SIZE)
    async with (
        open_ibkr_sim(book, tick_interval=IBKR_TICK_S) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=DXLINK_TICK_S) as tt_sim,
    ):
        settings = replace(
            settings,
            brokers=("ibkr", "tastytrade"),
            ibkr_url=ib_sim.url,
            ibkr_ca_file=ib_sim.ca_file,
            tt_api_url=tt_sim.api_url,
            tt_secret=tt_sim.secret,
            tt_refresh=tt_sim.refresh_token,
            tt_account=None,
            # at ~25 rows/s a 1 s flush interval alone would be the latency; a live page
            # wants rows within a fraction of a second
            flush_ms=min(settings.flush_ms, 200),
        )
        sources: list[Source] = build_sources(settings)

        async def report(service: RunningService) -> None:
            print(f"greeksd demo: dashboard at {service.api_url}/", flush=True)
            print(f"  API: curl {service.api_url}/v1/streaming/status", flush=True)
            with trio.move_on_after(duration_s if duration_s > 0 else float("inf")):
                while True:
                    await trio.sleep(status_every_s)
                    print(status_line(service), flush=True)
            print("demo finished: " + status_line(service), flush=True)

        return await run_until_signal(settings, sources, while_running=report)
