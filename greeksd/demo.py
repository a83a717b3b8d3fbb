"""`greeksd demo`: every broker's simulator, the database and the whole service, in one
process tree.

The simulators hold the same book and run in the same nursery as the service; the
service's streams are the real ones, built from settings that each broker's spec points
at its simulator (greeksd.brokers.spec.SimEntry.demo), so the demo exercises exactly
what `greeksd run` does.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime

import trio

from greeksd.brokers import registry
from greeksd.config import Settings
from greeksd.model import Source
from greeksd.service import RunningService, run_until_signal
from greeksd.sim.market import showcase_book


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
    book = showcase_book(datetime.now(UTC).date())
    async with AsyncExitStack() as simulators:
        brokers = []
        for spec in registry.specs():
            if spec.sim is not None:
                pointed = await simulators.enter_async_context(
                    spec.sim.demo(book, settings.broker(spec))
                )
                settings = settings.with_broker(spec, pointed)
                brokers.append(spec.name)
        settings = replace(
            settings,
            brokers=tuple(brokers),
            named=(),  # the demo's sources are its simulators, not the settings file's
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
