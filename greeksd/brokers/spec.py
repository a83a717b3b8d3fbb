"""What greeksd needs to know about a broker, in one value: its `BrokerSpec`.

Each broker package exports one spec (`greeksd/brokers/<name>/spec.py: SPEC`) and
`greeksd.brokers.registry` lists them. Everything outside the package that used to name
brokers reads the spec instead: the configuration (the broker's own settings table,
`GREEKSD_<prefix>*`), `greeksd run`/`record` (the stream), `replay` (the replayer),
`greeksd probe`, `greeksd sim`, the demo, the trades route and the benchmarks. An entry a
broker does not have (no simulator, no probe) is None, and the command that needs it does
not offer the broker.

A spec holds functions, not objects: building a stream imports the broker's client
(and its SDK), opening a simulator imports the simulator, so reading the registry (the
configuration does, at every start) costs neither.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from greeksd.model import ContractKey, Recorder, Snapshot, Source
from greeksd.recording import Record
from greeksd.sim.market import SimContract

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


@dataclass(frozen=True)
class NoSettings:
    """The settings table of a broker that has no settings."""


class ReplayCounts(Protocol):
    """What a replayer counts (greeksd.replay.ReplayStats)."""

    malformed: int
    rejected_events: int


class Replayer(Protocol):
    """A broker's protocol state rebuilt from a recording, record by record, as its live
    stream built it (greeksd.replay): a `link` record starts a new connection, a
    `positions` record is what the stream tracked, a frame yields its rows."""

    def link(self, record: Record) -> None: ...

    def positions(self, record: Record) -> None: ...

    def frame(self, record: Record, stats: ReplayCounts) -> list[Snapshot]: ...


@dataclass(frozen=True)
class SimEntry(Generic[S]):
    """The broker's simulator (greeksd.sim), for `greeksd sim <name>` and the demo."""

    help: str
    """What `greeksd sim --help` says it is."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """The options of `greeksd sim <name>`."""
    serve: Callable[[argparse.Namespace], Awaitable[None]]
    """Serve with those options until cancelled (Ctrl-C), printing where."""
    demo: Callable[[Sequence[SimContract], S], AbstractAsyncContextManager[S]]
    """`greeksd demo`: the simulator holding this book, at a lively pace, for the block;
    yields the given settings pointed at it."""


class BenchSim(Protocol[S_co]):
    """A simulator the end-to-end benchmark drives: it offers ticks only when asked."""

    @property
    def settings(self) -> S_co:
        """The broker's settings pointed at this simulator."""
        ...

    def subscribed(self, keys: Collection[ContractKey]) -> bool:
        """The client streams every one of these contracts."""
        ...

    def use_account(self, account: str) -> None:
        """Serve the login as account `account` (its rows' account_id), so several
        simulators of one broker write distinguishable rows; before the client connects."""
        ...

    async def offer(self, count: int) -> None:
        """Send `count` ticks now."""
        ...

    def sent(self) -> int:
        """Ticks sent so far (each one row, when nothing is lost)."""
        ...

    def dropped(self) -> int:
        """Ticks the simulator itself could not send (its own outbox full)."""
        ...

    def latency_ms(self, contract_key: str, event_ms: int, persisted_s: float) -> float | None:
        """A stored row's latency from the moment its tick was sent (None: not known)."""
        ...


@dataclass(frozen=True)
class BenchEntry(Generic[S]):
    """What the benchmarks (greeksd.bench) need of the broker."""

    records: Callable[[Sequence[SimContract], int, int], Iterator[dict[str, Any]]]
    """Fixture records (link, positions, frames) holding `count` snapshots of this book
    from `start_ms` on, for the pipeline benchmark: `records(book, count, start_ms)`."""
    e2e: Callable[[Sequence[SimContract], S], AbstractAsyncContextManager[BenchSim[S]]]
    """The simulator holding this book, silent until offered ticks, for the block."""


@dataclass(frozen=True)
class BrokerSpec(Generic[S]):
    """One broker, as everything outside its package sees it."""

    name: str
    """The stream's name: `GREEKSD_BROKERS`, rows' `broker`, fixtures, status, API."""
    settings: type[S]
    """Its settings: a frozen dataclass whose fields carry `settings_table.setting` rows."""
    prefix: str
    """Its variables are `GREEKSD_<prefix><FIELD>` (e.g. `IBKR_` -> GREEKSD_IBKR_URL)."""
    stream: Callable[[str, S, Recorder | None], Source]
    """The `Source` that `greeksd run` supervises: `stream(source_name, settings,
    recorder)`, named `source_name` (greeksd.sources), recording to the recorder if any."""
    replayer: Callable[[], Replayer] | None = None
    """`greeksd replay`; also what makes the broker recordable (`greeksd record`)."""
    probe: Callable[[S, float, Path], Awaitable[int]] | None = None
    """`greeksd probe <name>`: (settings, duration_s, out_dir) -> exit code."""
    sim: SimEntry[S] | None = None
    trades: bool = False
    """Its trades can be logged: POST /v1/trades accepts entries for it."""
    bench: BenchEntry[S] | None = None
