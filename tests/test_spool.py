"""The disk spool: exact round trip, crash-torn tails, corruption, the size cap, and the
writer spooling while the database refuses and draining in order when it is back."""

from __future__ import annotations

import zlib
from datetime import date, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg
import pytest
import trio
import trio.testing

from greeksd.model import Snapshot
from greeksd.store.columns import snapshot_to_dict
from greeksd.store.spool import MAGIC, Spool, SpoolFull
from greeksd.store.writer import Writer
from tests.factories import make_snapshot
from tests.helpers import count_rows, fetch_rows


def test_batches_round_trip_exactly_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", max_bytes=10_000_000)
    tz = timezone(timedelta(hours=2))
    first = [make_snapshot(i) for i in range(3)]
    second = [
        make_snapshot(
            9,
            strike=Decimal("512.5"),
            expiration=date(2027, 1, 15),
            event_time=make_snapshot(9).event_time.astimezone(tz),
            rho=None,
            multiplier=None,
            source_payload={"7308": "0.5", "n": [1, 2]},
            market_data="delayed",
        )
    ]
    spool.append(first)
    spool.append(second)
    assert list(spool.batches()) == [first, second]
    assert bool(spool)
    spool.clear()
    assert list(spool.batches()) == [] and not spool


def test_records_spooled_before_the_market_data_flag_still_read(tmp_path: Path) -> None:
    """A spool written by the previous version (no `market_data` key) drains after an
    upgrade: the flag is unknown (None), everything else as it was."""
    path = tmp_path / "s.spool"
    old = snapshot_to_dict(make_snapshot(0))
    del old["market_data"]
    payload = orjson.dumps([old])
    with path.open("wb") as f:
        f.write(MAGIC + len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big"))
        f.write(payload)
    ((snapshot,),) = Spool(path, max_bytes=10_000_000).batches()
    assert snapshot == make_snapshot(0, received_at=snapshot.received_at)
    assert snapshot.market_data is None


def test_torn_last_record_is_cut_and_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=10_000_000)
    spool.append([make_snapshot(0)])
    intact = path.stat().st_size
    with path.open("ab") as f:  # a crash half-way through the next append
        f.write(MAGIC + b"\x00\x00\x01\x00" + b"\x00\x00\x00\x00" + b'[{"broker"')
    reopened = Spool(path, max_bytes=10_000_000)
    assert path.stat().st_size == intact
    assert [len(b) for b in reopened.batches()] == [1]
    assert reopened.corrupt_records == 1
    assert path.with_suffix(".spool.corrupt").stat().st_size > 0
    reopened.append([make_snapshot(1)])
    assert [len(b) for b in reopened.batches()] == [1, 1]


def test_size_cap_refuses_loudly(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", max_bytes=2_000)
    spool.append([make_snapshot(0)])
    with pytest.raises(SpoolFull, match="GREEKSD_SPOOL_MAX_MB"):
        spool.append([make_snapshot(i) for i in range(20)])
    assert [len(b) for b in spool.batches()] == [1]


class SwitchableDatabase:
    """A connect function the test can turn off and on, standing in for the network."""

    def __init__(self) -> None:
        self.up = True

    def __call__(self, url: str) -> psycopg.Connection:
        if not self.up:
            raise psycopg.OperationalError("connection refused (database switched off)")
        return psycopg.connect(url)


async def test_writer_spools_while_down_and_drains_in_order(
    db_url: str, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    database = SwitchableDatabase()
    spool = Spool(tmp_path / "s.spool", max_bytes=10_000_000)
    writer = Writer(db_url, store_payload=True, spool=spool, connect=database)
    await writer.write_batch([make_snapshot(i) for i in range(5)])
    database.up = False
    writer._close()  # the outage also breaks the open connection
    for start in (5, 10, 15):
        await writer.write_batch([make_snapshot(i) for i in range(start, start + 5)])
    assert writer.stats.state.value == "degraded"
    assert writer.stats.spooled_rows == 15 and writer.stats.spool_bytes == spool.size > 0
    assert count_rows(db_url) == 5
    database.up = True
    await trio.sleep(5.1)  # virtual: past the longest retry delay, so the next batch tries
    await writer.write_batch([make_snapshot(i) for i in range(20, 25)])
    assert writer.stats.spool_bytes == 0 and not spool
    seqs = [
        r[0]
        for r in fetch_rows(
            db_url,
            "SELECT (source_payload->>'seq')::int FROM"
            " greek_snapshots ORDER BY persisted_at, event_time",
        )
    ]
    assert sorted(seqs) == list(range(25)), "nothing lost, nothing doubled"
    assert seqs[5:20] == list(range(5, 20)), "spooled batches committed before the new one"


async def test_leftover_spool_is_drained_first_at_start(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    Spool(path, max_bytes=10_000_000).append([make_snapshot(i) for i in range(7)])
    send, receive = trio.open_memory_channel(10)
    writer = Writer(db_url, store_payload=True, spool=Spool(path, max_bytes=10_000_000))
    send.close()
    await writer.run(receive)
    assert count_rows(db_url) == 7 and Spool(path, max_bytes=1).size == 0


async def test_spooled_batch_the_table_refuses_is_set_aside_not_dropped(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "s.spool"
    Spool(path, max_bytes=10_000_000).append([make_snapshot(0, account_id="x\x00y")])
    Spool(path, max_bytes=10_000_000).append([make_snapshot(1)])
    writer = Writer(db_url, store_payload=True, spool=Spool(path, max_bytes=10_000_000))
    send, receive = trio.open_memory_channel(10)
    send.close()
    await writer.run(receive)
    assert writer.stats.rejected_rows == 1 and count_rows(db_url) == 1
    assert "x\\u0000y" in path.with_suffix(".rejected.jsonl").read_text()


async def test_a_corrupt_record_mid_spool_is_set_aside_and_the_writer_moves_on(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=10_000_000)
    spool.append([make_snapshot(0)])
    spool.append([make_snapshot(1)])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # bit rot in the second record's payload
    path.write_bytes(bytes(data))
    reopened = Spool(path, max_bytes=10_000_000)
    writer = Writer(db_url, store_payload=True, spool=reopened)
    send, receive = trio.open_memory_channel[Snapshot](10)
    send.close()
    with trio.fail_after(10):
        await writer.run(receive)
    assert count_rows(db_url) == 1 and reopened.corrupt_records == 1
    assert writer.stats.spool_bytes == 0 and Spool(path, max_bytes=1).size == 0
    assert path.with_suffix(".spool.corrupt").stat().st_size > 0
