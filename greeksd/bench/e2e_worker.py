"""The service side of the end-to-end benchmark, in its own process (its own GIL).

    python -m greeksd.bench.e2e_worker '<json config>'

Runs the real streams of the configured brokers (each built by its spec from its own
settings, given as the environment variables that hold them) into the real pipeline
until stdin closes, then drains (every accepted row committed) and prints one JSON line:
its peak RSS and writer stats.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import trio

from greeksd import config, heap
from greeksd.brokers import registry
from greeksd.logs import configure_logging
from greeksd.model import StreamStatus, keeping_payload
from greeksd.pipeline import open_pipeline
from greeksd.settings_table import read_table


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent across fork + exec, so a child would report the benchmark's own peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


async def _until_stdin_closes() -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    while await stdin.receive_some():
        pass


async def serve(config: dict[str, Any]) -> dict[str, Any]:
    specs = [registry.SPECS[name] for name in config["brokers"]]
    statuses = {spec.name: StreamStatus(spec.name) for spec in specs}
    async with (
        _as_greeksd_run(),
        open_pipeline(
            config["db_url"], flush_rows=config["flush_rows"], flush_ms=config["flush_ms"]
        ) as pipeline,
        trio.open_nursery() as nursery,
    ):
        for spec in specs:
            settings = read_table(spec.settings, config["env"], spec.prefix)
            stream = spec.stream(spec.name, settings, None)
            nursery.start_soon(stream.run, pipeline.sink, statuses[spec.name])
        await _until_stdin_closes()
        nursery.cancel_scope.cancel()
    stats = pipeline.writer.stats
    return {
        "peak_rss_mb": peak_rss_mb(),
        "rows_written": stats.rows_written,
        "batches": stats.batches,
        "conflated": pipeline.sink.conflated,
        "ticks": {name: s.ticks for name, s in statuses.items()},
        "rejected_frames": {name: s.rejected_frames for name, s in statuses.items()},
    }


@contextlib.asynccontextmanager
async def _as_greeksd_run() -> AsyncIterator[None]:
    """What `greeksd run` does around its streams: rows carry no raw payload unless
    GREEKSD_STORE_PAYLOAD says so (greeksd.service), and the heap is settled after
    startup (greeksd.heap)."""
    heap.settle()
    with keeping_payload(config.STORE_PAYLOAD):
        yield


def main() -> None:
    configure_logging("ERROR")
    result = trio.run(serve, orjson.loads(sys.argv[1]))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
