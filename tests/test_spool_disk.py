"""The spool on a disk that refuses: a real full filesystem and a real read-only one
(small tmpfs mounts; the tests run as root), a real refused database connection (a closed
port) and the real test database once it "comes back". Nothing here mocks the filesystem
or the database: every ENOSPC and EROFS comes from the kernel.

What they prove: the service stays up and says why, the spool never keeps a torn record
nor claims a batch it did not fsync, rows conflate only loudly and with the reason, the
spool resumes when the disk frees, a restart on a full or read-only disk starts, rows
arriving during a start-up drain are durable, and every row accepted and not conflated
ends up in the table exactly once."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from psycopg_pool import ConnectionPool

from greeksd.api.metrics import render
from greeksd.api.state import ServiceState
from greeksd.backoff import Backoff
from greeksd.config import load_settings
from greeksd.model import Snapshot
from greeksd.pipeline import Pipeline, open_pipeline
from greeksd.service import open_service
from greeksd.store.reads import ReadPool
from greeksd.store.spool import MAGIC, Spool, SpoolUnavailable
from greeksd.store.spool_policy import BOTH_UNAVAILABLE, DATABASE_DOWN_NO_SPOOL
from greeksd.store.writer import Writer
from greeksd.supervisor import Supervisor
from tests.factories import make_snapshot
from tests.helpers import count_rows, fetch_rows, wait_until
from tests.test_api_streaming import parse_prometheus

CLOSED_PORT = "postgresql://127.0.0.1:1/x?connect_timeout=1"
MAX_BYTES = 100 * 1024 * 1024


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.2)


@dataclass
class Tmpfs:
    path: Path

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def fill(self, leave: int = 0) -> Path:
        """Write a filler file until the kernel says ENOSPC, then give `leave` bytes back."""
        filler = self.path / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    os.write(fd, b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
            if leave:
                os.ftruncate(fd, os.fstat(fd).st_size - leave)
        finally:
            os.close(fd)
        return filler


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 256 KiB tmpfs of this test's own (mounted as root; skipped where mount is not
    permitted, e.g. an unprivileged container)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {detail}")
    try:
        yield Tmpfs(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Reroutable:
    """Connect to whichever server the test points at now: the closed port (a real,
    refused TCP connection) or the test database once it is 'back'."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, _url: str) -> psycopg.Connection:
        return psycopg.connect(self.url, connect_timeout=2)


def seqs(batches: Iterator[list[Snapshot]]) -> list[int]:
    return [s.source_payload["seq"] for batch in batches for s in batch]  # type: ignore[index]


def stored_seq_counts(db_url: str) -> dict[int, int]:
    return dict(
        fetch_rows(
            db_url,
            "SELECT (source_payload->>'seq')::int, count(*) FROM greek_snapshots GROUP BY 1",
        )
    )


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


def metrics_of(pipeline: Pipeline) -> dict[str, float]:
    state = ServiceState(
        None,  # type: ignore[arg-type]  # render reads only the writer, sink and streams
        "",
        Supervisor(pipeline.sink),
        pipeline.writer,
        pipeline.sink,
        ReadPool(ConnectionPool("", open=False), 1, 0.1),  # never opened: render reads
        # only its refusal counters
        pipeline.trade_writer,
    )
    return parse_prometheus(render(state))


def test_append_on_a_full_disk_raises_a_typed_error_and_leaves_no_torn_record(
    tmpfs: Tmpfs,
) -> None:
    path = tmpfs.path / "spool" / "s.spool"
    spool = Spool(path, MAX_BYTES)
    spool.append([make_snapshot(0)])
    intact = path.stat().st_size
    filler = tmpfs.fill(leave=4096)  # room for part of the next record only
    big = [make_snapshot(i) for i in range(1, 30)]
    with pytest.raises(SpoolUnavailable) as raised:
        spool.append(big)
    assert raised.value.errno_name == "ENOSPC" and "ENOSPC" in raised.value.reason
    assert path.stat().st_size == intact, "the half-written record was cut back"
    assert spool.size == intact
    filler.unlink()
    spool.append(big)
    fresh = Spool(path, MAX_BYTES)
    assert fresh.corrupt_records == 0
    assert seqs(fresh.batches()) == list(range(30))


async def test_full_disk_and_database_down_degrade_loudly_then_lose_and_double_nothing(
    db_url: str, tmpfs: Tmpfs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmpfs.path / "spool" / "snapshots.spool"
    spool = Spool(path, MAX_BYTES)
    filler = tmpfs.fill(leave=4096)  # the first append tears half-way: it must be undone
    database = Reroutable(CLOSED_PORT)
    async with open_pipeline(
        CLOSED_PORT,
        store_payload=True,
        flush_rows=10,
        flush_ms=20,
        queue_size=30,
        spool=spool,
        backoff=fast_backoff(),
        connect=database,
    ) as pipeline:
        sink, stats = pipeline.sink, pipeline.writer.stats
        for i in range(10):
            sink.put(make_snapshot(i))
        await wait_until(lambda: stats.spool_state == "unavailable", what="spool unavailable")
        await wait_until(lambda: stats.spool_errors >= 2, what="the spool retried")
        assert stats.spool_error is not None and "ENOSPC" in stats.spool_error
        assert stats.state.value == "degraded", "and the service is still running"
        assert stats.holding_reason == BOTH_UNAVAILABLE and stats.held_rows == 10
        assert stats.spooled_rows == 0 and not events(caplog, "batch_spooled")
        assert path.stat().st_size == 0, "no torn record left in the spool"

        for i in range(10, 200):  # far more than the channel holds, 5 contracts
            sink.put(make_snapshot(i))
        assert sink.conflated > 0
        assert stats.conflated_by_reason == {BOTH_UNAVAILABLE: sink.conflated}
        status = stats.as_json()
        assert status["spool_state"] == "unavailable" and "ENOSPC" in status["spool_error"]
        assert status["holding_reason"] == BOTH_UNAVAILABLE
        assert status["conflated_by_reason"] == {BOTH_UNAVAILABLE: sink.conflated}
        samples = metrics_of(pipeline)
        assert samples['greeksd_spool_state{state="unavailable"}'] == 1
        assert samples["greeksd_spool_errors_total"] == stats.spool_errors
        assert samples["greeksd_held_rows"] == 10
        reason_metric = f'greeksd_conflated_by_reason_total{{reason="{BOTH_UNAVAILABLE}"}}'
        assert samples[reason_metric] == sink.conflated
        assert any("ENOSPC" in e["error"] for e in events(caplog, "spool_unavailable"))
        assert {e["reason"] for e in events(caplog, "rows_conflated")} == {BOTH_UNAVAILABLE}
        logged = len(events(caplog, "spool_unavailable"))
        assert logged < stats.spool_errors, "the failure log is rate-limited"

        filler.unlink()  # the disk frees while the database is still down
        kept = sink.accepted - sink.conflated
        await wait_until(
            lambda: stats.spool_state == "ok" and stats.spooled_rows == kept,
            what="everything not conflated spooled once there is room",
        )
        assert stats.holding_reason is None and stats.held_rows == 0
        assert sorted(seqs(Spool(path, MAX_BYTES).batches())) == sorted(
            s for s in range(200) if s < 40 or s >= 200 - 5
        ), "the held batch, the channel's rows and the newest row of each contract"

        database.url = db_url  # the database is back
        await wait_until(lambda: stats.spool_bytes == 0, what="spool drained")
    stored = stored_seq_counts(db_url)
    assert set(stored.values()) == {1}, "nothing doubled"
    assert len(stored) == sink.accepted - sink.conflated, "nothing lost but what conflated"


async def test_without_a_spool_a_database_outage_holds_rows_under_its_own_reason(
    db_url: str,
) -> None:
    """The limit case of a refusing spool: none configured (`greeksd replay`). The batch
    waits in memory and what conflates behind it is counted under the database outage,
    not under "writer behind the inflow"; once the database is back all the rest lands."""
    database = Reroutable(CLOSED_PORT)
    async with open_pipeline(
        CLOSED_PORT,
        store_payload=True,
        flush_rows=10,
        flush_ms=20,
        queue_size=30,
        backoff=fast_backoff(),
        connect=database,
    ) as pipeline:
        sink, stats = pipeline.sink, pipeline.writer.stats
        for i in range(10):
            sink.put(make_snapshot(i))
        await wait_until(lambda: stats.held_rows == 10, what="batch held in memory")
        assert stats.holding_reason == DATABASE_DOWN_NO_SPOOL
        assert stats.spool_state == "none" and stats.state.value == "degraded"
        for i in range(10, 200):
            sink.put(make_snapshot(i))
        assert sink.conflated > 0
        assert stats.conflated_by_reason == {DATABASE_DOWN_NO_SPOOL: sink.conflated}
        assert metrics_of(pipeline)["greeksd_held_rows"] == 10

        database.url = db_url
        kept = sink.accepted - sink.conflated
        await wait_until(lambda: stats.rows_written == kept, what="the rest written")
        assert stats.holding_reason is None and stats.held_rows == 0
    stored = stored_seq_counts(db_url)
    assert set(stored.values()) == {1} and len(stored) == kept


async def test_read_only_spool_at_start_starts_degraded_and_resumes_after_remount(
    db_url: str, tmpfs: Tmpfs
) -> None:
    tmpfs.remount("ro")
    path = tmpfs.path / "spool" / "snapshots.spool"
    spool = Spool(path, MAX_BYTES)  # mkdir is refused: no exception
    assert spool.error is not None and "EROFS" in spool.error
    database = Reroutable(CLOSED_PORT)
    async with open_pipeline(
        CLOSED_PORT,
        store_payload=True,
        flush_rows=10,
        flush_ms=20,
        spool=spool,
        backoff=fast_backoff(),
        connect=database,
    ) as pipeline:
        stats = pipeline.writer.stats
        assert stats.spool_state == "unavailable" and "EROFS" in (stats.spool_error or "")
        for i in range(10):
            pipeline.sink.put(make_snapshot(i))
        await wait_until(lambda: stats.held_rows == 10, what="batch held in memory")
        assert stats.holding_reason == BOTH_UNAVAILABLE and stats.spooled_rows == 0

        tmpfs.remount("rw")
        await wait_until(
            lambda: stats.spool_state == "ok" and stats.spooled_rows == 10, what="spooled"
        )
        assert seqs(Spool(path, MAX_BYTES).batches()) == list(range(10))
        database.url = db_url
        await wait_until(lambda: stats.spool_bytes == 0, what="spool drained")
    assert stored_seq_counts(db_url) == {i: 1 for i in range(10)}


async def test_service_starts_on_a_read_only_data_dir_and_says_so(
    db_url: str, tmp_path: Path, tmpfs: Tmpfs
) -> None:
    tmpfs.remount("ro")
    settings = load_settings(
        {
            "GREEKSD_DATABASE_URL": db_url,
            "GREEKSD_DATA_DIR": str(tmpfs.path),
            "GREEKSD_API_PORT": "0",
            "GREEKSD_FLUSH_MS": "20",
        },
        dotenv_path=tmp_path / "none.env",
    )
    async with open_service(settings, []) as service:
        async with httpx.AsyncClient(base_url=service.api_url, timeout=10) as client:
            writer = (await client.get("/v1/streaming/status")).json()["writer"]
            samples = parse_prometheus((await client.get("/metrics")).text)
        assert writer["spool_state"] == "unavailable" and "EROFS" in writer["spool_error"]
        assert samples['greeksd_spool_state{state="unavailable"}'] == 1
        service.state.sink.put(make_snapshot(0))
        await service.state.writer.wait_settled(1)  # the database is fine: rows still flow
        tmpfs.remount("rw")
        stats, n = service.state.writer.stats, 1
        while stats.spool_state != "ok":  # the writer re-checks the spool as rows commit
            service.state.sink.put(make_snapshot(n))
            n += 1
            await wait_until(lambda: stats.rows_written == n, what=f"{n} rows written")  # noqa: B023
            assert n < 100, "spool never seen available again after the remount"
        assert stats.spool_error is None
    assert count_rows(db_url) == n


def _spool_with_torn_tail(path: Path) -> int:
    spool = Spool(path, MAX_BYTES)
    spool.append([make_snapshot(0), make_snapshot(1)])
    spool.append([make_snapshot(2)])
    intact = path.stat().st_size
    with path.open("ab") as f:  # a crash half-way through the next append
        f.write(MAGIC + b"\x00\x00\x01\x00" + b"\x00\x00\x00\x00" + b'[{"broker"')
    return intact


def test_restart_on_a_full_disk_with_a_torn_tail_opens(
    tmpfs: Tmpfs, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmpfs.path / "spool" / "snapshots.spool"
    intact = _spool_with_torn_tail(path)
    filler = tmpfs.fill()  # not even room for the `.corrupt` copy
    reopened = Spool(path, MAX_BYTES)
    assert reopened.error is None, "the tail could still be cut"
    assert path.stat().st_size == intact
    assert seqs(reopened.batches()) == [0, 1, 2]
    assert reopened.corrupt_records == 1 and reopened.quarantine_failures == 1
    [failed] = events(caplog, "spool_quarantine_failed")
    assert "ENOSPC" in failed["error"] and failed["bytes_lost"] > 0
    filler.unlink()
    reopened.append([make_snapshot(3)])
    assert seqs(Spool(path, MAX_BYTES).batches()) == [0, 1, 2, 3]


def test_restart_on_a_read_only_disk_with_a_torn_tail_opens_and_recovers(tmpfs: Tmpfs) -> None:
    path = tmpfs.path / "spool" / "snapshots.spool"
    intact = _spool_with_torn_tail(path)
    tmpfs.remount("ro")
    reopened = Spool(path, MAX_BYTES)  # neither the copy nor the cut is possible
    assert reopened.error is not None and "EROFS" in reopened.error
    assert seqs(reopened.batches()) == [0, 1, 2], "what is intact can still be drained"
    with pytest.raises(SpoolUnavailable, match="EROFS"):
        reopened.append([make_snapshot(3)])
    tmpfs.remount("rw")
    reopened.append([make_snapshot(3)])  # cuts the tail (kept aside) first
    assert seqs(Spool(path, MAX_BYTES).batches()) == [0, 1, 2, 3]
    corrupt = path.with_suffix(".spool.corrupt")
    assert corrupt.read_bytes().startswith(MAGIC)
    assert path.stat().st_size > intact


def _leftover(path: Path, rows: range, per_batch: int = 10) -> None:
    spool = Spool(path, MAX_BYTES)
    for start in rows[::per_batch]:
        spool.append([make_snapshot(i) for i in range(start, min(start + per_batch, rows.stop))])


async def test_rows_arriving_while_the_database_is_down_at_start_are_spooled(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshots.spool"
    _leftover(path, range(30))
    database = Reroutable(CLOSED_PORT)
    async with open_pipeline(
        CLOSED_PORT,
        store_payload=True,
        flush_rows=10,
        flush_ms=20,
        spool=Spool(path, MAX_BYTES),
        backoff=fast_backoff(),
        connect=database,
    ) as pipeline:
        for i in range(100, 150):
            pipeline.sink.put(make_snapshot(i))
        await wait_until(
            lambda: seqs(Spool(path, MAX_BYTES).batches()) == [*range(30), *range(100, 150)],
            what="new rows durable behind the leftover ones",
        )
        database.url = db_url
        await wait_until(lambda: pipeline.writer.stats.spool_bytes == 0, what="spool drained")
    assert stored_seq_counts(db_url) == {i: 1 for i in [*range(30), *range(100, 150)]}


async def test_rows_arriving_during_a_start_up_drain_are_durable_and_stored_in_order(
    db_url: str, tmp_path: Path
) -> None:
    """The drain is held up by a real table lock after it has begun; rows put meanwhile
    must reach the spool file (not wait in memory) and the table after the old ones."""
    path = tmp_path / "snapshots.spool"
    _leftover(path, range(30))
    with psycopg.connect(db_url) as blocker:
        blocker.execute("LOCK TABLE greek_snapshots IN ACCESS EXCLUSIVE MODE")
        async with open_pipeline(
            db_url, store_payload=True, flush_rows=10, flush_ms=20, spool=Spool(path, MAX_BYTES)
        ) as pipeline:
            try:
                for i in range(100, 150):
                    pipeline.sink.put(make_snapshot(i))
                await wait_until(
                    lambda: (
                        seqs(Spool(path, MAX_BYTES).batches()) == [*range(30), *range(100, 150)]
                    ),
                    what="new rows appended to the spool while the drain waits",
                )
                assert pipeline.writer.stats.rows_written == 0, "the drain is still held up"
            finally:
                blocker.rollback()  # else a failure would leave the writer stuck on the lock
            await wait_until(lambda: pipeline.writer.stats.spool_bytes == 0, what="spool drained")
    ordered = [
        r[0]
        for r in fetch_rows(
            db_url,
            "SELECT (source_payload->>'seq')::int FROM greek_snapshots"
            " ORDER BY persisted_at, (source_payload->>'seq')::int",
        )
    ]
    assert ordered == [*range(30), *range(100, 150)], "exactly once, old rows first"


async def test_spooled_batch_refused_on_a_full_disk_stays_spooled_until_there_is_room(
    db_url: str, tmpfs: Tmpfs, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmpfs.path / "spool" / "snapshots.spool"
    Spool(path, MAX_BYTES).append([make_snapshot(0, account_id="x\x00y")])
    Spool(path, MAX_BYTES).append([make_snapshot(1)])
    filler = tmpfs.fill()
    rejected = path.with_suffix(".rejected.jsonl")

    async def run_writer() -> Writer:
        writer = Writer(
            db_url, store_payload=True, spool=Spool(path, MAX_BYTES), backoff=fast_backoff()
        )
        send, receive = trio.open_memory_channel[Snapshot](10)
        send.close()
        await writer.run(receive)
        return writer

    writer = await run_writer()
    assert writer.stats.rejected_rows == 0 and writer.stats.spool_errors >= 1
    assert "ENOSPC" in (writer.stats.spool_error or "")
    assert events(caplog, "spooled_batch_reject_failed")
    assert not rejected.exists() or rejected.stat().st_size == 0, "no half-written line"
    assert seqs(Spool(path, MAX_BYTES).batches()) == [0, 1], "still spooled, order kept"
    assert count_rows(db_url) == 0

    filler.unlink()
    writer = await run_writer()
    assert writer.stats.rejected_rows == 1 and count_rows(db_url) == 1
    assert "x\\u0000y" in rejected.read_text()
    assert Spool(path, MAX_BYTES).size == 0
