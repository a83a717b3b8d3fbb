"""A bulk replay's sources split over processes, one pipeline each.

Every source's protocol state is its own (greeksd.replay.Replayers keeps one replayer
per source), so the records of different sources can be replayed apart: each part
reads the whole fixture, keeps its own sources' records, and runs them through the same
Connection, sink, writer and COPY as a one-process replay, into the same database. Rows
are the same; only their interleaving between the parts' commits differs, which nothing
depends on (a contract's rows all come from its one source, in file order).

Why processes: a row costs greeksd 10-20 µs of Python (decode, normalise, encode for
COPY) under one GIL, so one process tops out near 50k rows/s however many cores there
are, while PostgreSQL and a second source's decoding could use the other cores. Part 0
runs in the calling process, so the parts that pay a fresh interpreter's start (~0.3 s)
are the smaller share; the others are `python -m greeksd.replay_parts` children, each
given its part, the database URL and its settings as the first line of its stdin (so no
secret shows in `ps` or in the environment), logging to the same stderr and answering
with its stats as JSON on stdout. A child that fails fails the replay, with its exit
code. Stopping is the pipe's end: the replay closes it when told to stop (SIGINT or
SIGTERM, `stop_on_signals`), and its death closes it too, so a child stops reading and
commits what it had handed to its writer before it exits, never left loading as an
orphan. A replay is idempotent, so running it again completes an interrupted one.

Sources go to parts in the order of the fixture header's `brokers` (round robin); a
source the header does not name goes to part 0, as do lines that cannot be read at all
(part 0 alone logs and counts those, so each is reported once).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import trio

from greeksd.logs import configure_logging, get_logger

log = get_logger("greeksd.replay")
T = TypeVar("T")

AUTO = 0
"""`processes=AUTO`: as many parts as the fixture names sources, at most one per CPU,
for a fixture of at least `SPLIT_MIN_BYTES`."""
SPLIT_MIN_BYTES = 4 * 1024 * 1024
"""A smaller fixture (under ~15k rows plain, ~150k gzipped) is replayed in one process
under AUTO: its whole load takes about what a child's start does (~0.3 s)."""


@dataclass(frozen=True)
class SourcePart:
    """One part's share of the records: its own sources, or for part 0 every source no
    other part has (including sources the header never named)."""

    index: int
    sources: tuple[frozenset[str], ...]
    # the other parts' sources in one set: `keeps` runs once per fixture line
    _others: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        others = frozenset().union(*(s for i, s in enumerate(self.sources) if i != self.index))
        object.__setattr__(self, "_others", others)

    @property
    def reports_damage(self) -> bool:
        return self.index == 0

    def keeps(self, source: Any) -> bool:
        if self.index:
            return source in self.sources[self.index]
        return source not in self._others

    def describe(self) -> str:
        named = ",".join(sorted(self.sources[self.index])) or "-"
        return f"{named} (and any other)" if self.index == 0 else named


def plan(header: dict[str, Any], size: int, processes: int = AUTO) -> list[SourcePart]:
    """The parts for a fixture with `header` and `size` bytes on disk: `processes` at
    most (AUTO: one per CPU, and one in all below `SPLIT_MIN_BYTES`), never more than
    its named sources; one part means a one-process replay."""
    if processes == AUTO and size < SPLIT_MIN_BYTES:
        processes = 1
    named = header.get("brokers")
    sources = (
        list(dict.fromkeys(s for s in named if isinstance(s, str)))
        if isinstance(named, list)
        else []
    )
    limit = processes if processes > 0 else usable_cpus()
    count = max(1, min(limit, len(sources)))
    shares = tuple(frozenset(sources[i::count]) for i in range(count))
    return [SourcePart(i, shares) for i in range(count)]


def usable_cpus() -> int:
    """The CPUs this process may run on (Linux: its affinity, e.g. under `taskset` or a
    container's cpuset; elsewhere the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class PartOptions:
    """What a part needs besides its share: the replay's own arguments."""

    flush_rows: int
    flush_ms: int
    instance: str | None
    store_payload: bool


LoadPart = Callable[[str, Path, SourcePart | None, PartOptions, trio.Event], Awaitable[Any]]
"""greeksd.replay.load_part: one part's replay; setting the event stops its reading."""


class ReplayPartFailed(RuntimeError):
    """A child part failed, or ended without its stats: the replay did not complete."""


async def run_child(
    url: str, path: Path, part: SourcePart, options: PartOptions, stop: trio.Event
) -> dict[str, Any]:
    """Run `part` in a child process; its stats as the dict it printed. The child reads
    its spec as the first line of its stdin and stops at the end of it: setting `stop`
    closes the pipe, and so does this process's death, so the child stops reading,
    commits what it handed over and answers (or, orphaned, just exits)."""
    spec = {
        "url": url,
        "path": str(path),
        "index": part.index,
        "sources": [sorted(s) for s in part.sources],
        "options": dataclasses.asdict(options),
        "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
    }
    done: list[subprocess.CompletedProcess[bytes]] = []
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[trio.Process]) -> None:
            done.append(
                await trio.run_process(
                    [sys.executable, "-m", "greeksd.replay_parts"],
                    stdin=subprocess.PIPE,
                    capture_stdout=True,
                    stderr=None,
                    check=False,
                    # its own session: a terminal's Ctrl-C reaches the replay only, which
                    # then stops the child through the pipe
                    start_new_session=True,
                    task_status=task_status,
                )
            )
            nursery.cancel_scope.cancel()  # the relay below

        process = await nursery.start(run)
        assert process.stdin is not None
        await process.stdin.send_all(orjson.dumps(spec) + b"\n")

        async def relay_stop(pipe: trio.abc.SendStream) -> None:
            await stop.wait()
            await pipe.aclose()

        nursery.start_soon(relay_stop, process.stdin)
    code, out = done[0].returncode, done[0].stdout
    if code != 0 or not out:
        raise ReplayPartFailed(
            f"replay part {part.index} (sources {part.describe()}) exited with code "
            f"{code}; its log above says why"
        )
    stats: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return stats


# ---- stopping on a signal ----------------------------------------------------------------
async def stop_on_signals(
    work: Callable[[trio.Event], Awaitable[T]], **context: Any
) -> tuple[T | None, int]:
    """Run `work(stop)` until done. A first SIGTERM or SIGINT sets `stop`: the replay
    stops reading, and its writer commits what it was handed. A second one ends that
    wait too (a database that is down would hold the rows forever): `work` is
    cancelled and its uncommitted rows are abandoned (None). The exit code says which:
    0, or 128 + the first signal."""
    stop = trio.Event()
    stopped_by = 0
    result: T | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                nonlocal stopped_by
                async for signum in signals:
                    if stopped_by:
                        log.error("replay_abandoned", signal=signum, **context)
                        nursery.cancel_scope.cancel()
                        return
                    log.warning("replay_stopping", signal=signum, **context)
                    stopped_by = signum
                    stop.set()

            nursery.start_soon(on_signal)
            result = await work(stop)
            nursery.cancel_scope.cancel()
    return result, 128 + stopped_by if stopped_by else 0


# ---- the child ---------------------------------------------------------------------------
async def _child_main(spec: dict[str, Any], load: LoadPart) -> tuple[Any | None, int]:
    part = SourcePart(spec["index"], tuple(frozenset(s) for s in spec["sources"]))

    async def work(stop: trio.Event) -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_at_end_of_stdin, stop, part.index)
            stats = await load(
                spec["url"], Path(spec["path"]), part, PartOptions(**spec["options"]), stop
            )
            nursery.cancel_scope.cancel()
        return stats

    return await stop_on_signals(work, part=part.index)


async def _stop_at_end_of_stdin(stop: trio.Event, part: int) -> None:
    """The replay closes the pipe to say stop (or died, which closes it too)."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as pipe:
        while await pipe.receive_some():
            pass
    log.warning("replay_stopping", part=part, reason="the replay closed the pipe")
    stop.set()


def main() -> int:
    """`python -m greeksd.replay_parts`: one part of a parallel replay (see the module)."""
    from greeksd import heap
    from greeksd.replay import load_part

    spec = orjson.loads(sys.stdin.buffer.readline())
    configure_logging(spec["log_level"])
    heap.settle()
    stats, code = trio.run(_child_main, spec, load_part)
    if stats is not None:
        sys.stdout.buffer.write(orjson.dumps(dataclasses.asdict(stats)) + b"\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
