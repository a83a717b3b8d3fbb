"""A replay split over processes (greeksd.replay_parts) stores exactly what a one-process
replay stores and counts the same; damaged lines are reported once; a child that fails
fails the replay; a child told to stop commits what it had handed over and says so."""

from __future__ import annotations

import dataclasses
import gzip
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio

from greeksd.bench.fixture import write_fixture
from greeksd.replay import ReplayStats, replay_fixture
from greeksd.replay_parts import (
    AUTO,
    SPLIT_MIN_BYTES,
    PartOptions,
    ReplayPartFailed,
    SourcePart,
    plan,
    run_child,
    usable_cpus,
)
from tests.helpers import count_rows, fetch_rows, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "mixed-session.jsonl.gz"
ROWS = (
    "SELECT source, broker, account_id, contract_key, event_time, received_at, quantity,"
    " multiplier, delta, gamma, theta, vega, rho, implied_volatility, underlying_price, bid,"
    " ask, last, mark, market_data, fingerprint FROM greek_snapshots"
    " ORDER BY source, contract_key, event_time, received_at, fingerprint"
)
OPTIONS = PartOptions(flush_rows=500, flush_ms=50, instance=None, store_payload=False)


def _counts(stats: ReplayStats) -> dict[str, object]:
    """Everything a replay counts, not its timings."""
    counts = dataclasses.asdict(stats)
    for timing in ("wall_s", "compact_s"):
        counts.pop(timing)
    return counts


async def test_a_split_replay_stores_and_counts_what_one_process_does(
    db_url: str, other_db_url: str
) -> None:
    one = await replay_fixture(db_url, FIXTURE, processes=1, compact=False)
    split = await replay_fixture(other_db_url, FIXTURE, processes=2, compact=False)

    assert fetch_rows(other_db_url, ROWS) == fetch_rows(db_url, ROWS)
    assert _counts(split) == _counts(one)
    assert split.frames_by_broker.keys() == {"ibkr", "tastytrade"}
    assert split.rows_written == count_rows(other_db_url) > 3000
    assert split.duplicates >= 1 and split.late >= 2 and split.malformed >= 6


async def test_damaged_lines_are_counted_once_across_the_parts(
    db_url: str, other_db_url: str, tmp_path: Path
) -> None:
    lines = gzip.decompress(FIXTURE.read_bytes()).splitlines(keepends=True)
    damaged = tmp_path / "damaged.jsonl"
    junk = [b"not json\n", b'{"t": "2026-11-25T15:30:00+00:00", "k": "frame"}\n', b"[1, 2]\n"]
    damaged.write_bytes(b"".join([lines[0], *junk, *lines[1:400], b'{"b": "ibkr"}\n']))

    one = await replay_fixture(db_url, damaged, processes=1, compact=False)
    split = await replay_fixture(other_db_url, damaged, processes=2, compact=False)

    assert one.rejected_records == 4
    assert _counts(split) == _counts(one)


def test_sources_go_round_robin_in_header_order_and_part_0_takes_the_unnamed() -> None:
    header = {"brokers": ["ibkr", "tastytrade", "ibkr:alice", "ibkr"]}
    parts = plan(header, SPLIT_MIN_BYTES, 2)
    assert [p.sources[p.index] for p in parts] == [
        frozenset({"ibkr", "ibkr:alice"}),
        frozenset({"tastytrade"}),
    ]
    assert parts[0].keeps("ibkr:bob") and not parts[1].keeps("ibkr:bob")  # unnamed
    assert parts[1].keeps("tastytrade") and not parts[0].keeps("tastytrade")
    assert parts[0].reports_damage and not parts[1].reports_damage


@pytest.mark.parametrize(
    ("header", "size", "processes", "count"),
    [
        ({"brokers": ["ibkr", "tastytrade"]}, SPLIT_MIN_BYTES - 1, AUTO, 1),  # small: no split
        ({"brokers": ["ibkr", "tastytrade"]}, SPLIT_MIN_BYTES - 1, 2, 2),  # asked for
        ({"brokers": ["ibkr", "tastytrade"]}, SPLIT_MIN_BYTES, 1, 1),
        ({"brokers": ["ibkr"]}, SPLIT_MIN_BYTES, 8, 1),  # never more parts than sources
        ({"brokers": "ibkr"}, SPLIT_MIN_BYTES, 2, 1),  # a header without a list: one part
        ({}, SPLIT_MIN_BYTES, 2, 1),
    ],
)
def test_how_many_parts(header: dict[str, object], size: int, processes: int, count: int) -> None:
    assert len(plan(header, size, processes)) == count


def test_auto_uses_every_cpu_at_most() -> None:
    sources = [f"ibkr:{n}" for n in range(64)]
    parts = plan({"brokers": sources}, SPLIT_MIN_BYTES, AUTO)
    assert len(parts) == min(64, usable_cpus())


async def test_a_child_that_fails_fails_the_replay(db_url: str, tmp_path: Path) -> None:
    part = SourcePart(1, (frozenset({"ibkr"}), frozenset({"tastytrade"})))
    with pytest.raises(ReplayPartFailed, match=r"part 1 \(sources tastytrade\) exited with code 1"):
        await run_child(db_url, tmp_path / "missing.jsonl", part, OPTIONS, trio.Event())


def _start_child(url: str, fixture: Path) -> subprocess.Popen[bytes]:
    """Part 1 (tastytrade) of `fixture`, as `run_child` starts one: the spec is the first
    line of its stdin, which stays open until it should stop."""
    spec = {
        "url": url,
        "path": str(fixture),
        "index": 1,
        "sources": [["ibkr"], ["tastytrade"]],
        "options": dataclasses.asdict(OPTIONS),
        "log_level": "WARNING",
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "greeksd.replay_parts"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None
    child.stdin.write(orjson.dumps(spec) + b"\n")
    child.stdin.flush()
    return child


def _wait_for_commits(db_url: str, child: subprocess.Popen[bytes]) -> None:
    """Until the child has committed rows: it is loading, its signal handlers are set."""

    async def committed() -> bool:
        assert child.poll() is None, f"the child ended with code {child.returncode}"
        return count_rows(db_url) > 0

    trio.run(partial(wait_until, committed, timeout=60, what="the child's first commit"))


def _read_until(child: subprocess.Popen[bytes], event: str) -> None:
    assert child.stderr is not None
    for line in child.stderr:
        if f"event={event}".encode() in line:
            return
    raise AssertionError(f"the child ended (code {child.wait()}) without logging {event}")


def test_a_child_told_to_stop_commits_what_it_handed_over(db_url: str, tmp_path: Path) -> None:
    fixture = write_fixture(tmp_path / "big.jsonl", ["ibkr", "tastytrade"], 150_000)
    child = _start_child(db_url, fixture)
    _wait_for_commits(db_url, child)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)  # (it writes a few lines only: no pipe fills up)
    assert child.stdout is not None and child.stderr is not None
    out, err = child.stdout.read(), child.stderr.read()

    assert child.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"replay_stopping" in err
    stats = ReplayStats.from_json(orjson.loads(out.splitlines()[-1]))
    assert 0 < stats.snapshots < 150_000  # stopped early ...
    assert stats.rows_written + stats.duplicates == stats.snapshots  # ... nothing dropped
    assert count_rows(db_url) == stats.rows_written
    assert stats.frames_by_broker.keys() == {"tastytrade"}


def test_a_second_signal_abandons_rows_a_dead_database_holds(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: every connect is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fixture = write_fixture(tmp_path / "small.jsonl", ["ibkr", "tastytrade"], 5_000)
    child = _start_child(f"postgresql://nobody@127.0.0.1:{port}/none", fixture)
    _read_until(child, "batch_write_failed")  # running, and its writer holds rows
    child.send_signal(signal.SIGTERM)
    _read_until(child, "replay_stopping")  # waits on the writer, which waits on the db
    assert child.poll() is None
    child.send_signal(signal.SIGTERM)
    _read_until(child, "replay_abandoned")

    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    assert child.stdout is not None and child.stdout.read() == b""  # no stats: incomplete


def test_a_child_stops_reading_and_commits_when_its_pipe_closes(
    db_url: str, tmp_path: Path
) -> None:
    """How the replay stops a part, and what its death (even by SIGKILL) does too."""
    fixture = write_fixture(tmp_path / "big.jsonl", ["ibkr", "tastytrade"], 150_000)
    child = _start_child(db_url, fixture)
    _wait_for_commits(db_url, child)
    assert child.stdin is not None
    child.stdin.close()
    _read_until(child, "replay_stopping")

    assert child.wait(timeout=60) == 0
    assert child.stdout is not None
    stats = ReplayStats.from_json(orjson.loads(child.stdout.read().splitlines()[-1]))
    assert 0 < stats.snapshots < 150_000
    assert count_rows(db_url) == stats.rows_written == stats.snapshots - stats.duplicates


async def test_a_stopped_split_replay_commits_what_every_part_read(
    db_url: str, tmp_path: Path
) -> None:
    fixture = write_fixture(tmp_path / "big.jsonl", ["ibkr", "tastytrade"], 150_000)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def replay() -> None:
            stats.append(await replay_fixture(db_url, fixture, processes=2, stop=stop))

        stats: list[ReplayStats] = []
        nursery.start_soon(replay)
        await wait_until(lambda: count_rows(db_url) >= 1000, timeout=60, what="1000 rows")
        stop.set()

    (done,) = stats
    assert 1000 <= done.snapshots < 300_000  # stopped early ...
    assert done.rows_written + done.duplicates == done.snapshots  # ... nothing dropped
    assert count_rows(db_url) == done.rows_written
    assert done.compacted == []  # a partial load is not compacted
