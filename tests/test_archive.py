"""The raw-frame archive: the real service against both simulators archives every frame
of every source; an archive file replays into exactly the rows the live run stored; the
frames command finds a stored row's frame; rotation and retention follow the (injected)
clock; a full disk (a real tmpfs) degrades the archive loudly while rows keep flowing."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import trio

from greeksd.api.metrics import render
from greeksd.archive import Archive, source_files
from greeksd.cli import build_sources
from greeksd.config import load_settings
from greeksd.recording import FanOut, FixtureWriter, read_fixture
from greeksd.replay import replay_fixture
from greeksd.service import RunningService, open_service
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import SIM_REFRESH, SIM_SECRET, open_tastytrade_sim
from tests.helpers import count_rows, fetch_rows, wait_until
from tests.test_api_streaming import parse_prometheus
from tests.test_spool_disk import Tmpfs, tmpfs  # noqa: F401 - the fixture

SOURCES = ("ibkr", "tastytrade")
ROWS = (
    "SELECT source, broker, account_id, contract_key, event_time, received_at, quantity,"
    " multiplier, delta, gamma, theta, vega, rho, implied_volatility, underlying_price, bid,"
    " ask, last, mark, market_data FROM greek_snapshots ORDER BY source, account_id,"
    " contract_key, event_time, received_at, delta NULLS FIRST, gamma NULLS FIRST"
)


async def run_service(
    db_url: str,
    data_dir: Path,
    while_running: Callable[[RunningService], Awaitable[None]],
    env: Mapping[str, str] | None = None,
) -> set[str]:
    """The service as `greeksd run` builds it, against both simulators, for as long as
    `while_running` takes; returns the DXLink tokens the simulator handed out."""
    book = default_contracts(datetime.now(UTC).date(), 4)
    async with (
        open_ibkr_sim(book, tick_interval=0.02) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=0.05) as tt_sim,
    ):
        settings = load_settings(
            {
                "GREEKSD_DATABASE_URL": db_url,
                "GREEKSD_DATA_DIR": str(data_dir),
                "GREEKSD_API_PORT": "0",
                "GREEKSD_BROKERS": ",".join(SOURCES),
                "GREEKSD_IBKR_URL": ib_sim.url,
                "GREEKSD_TT_API_URL": tt_sim.api_url,
                "GREEKSD_TT_SECRET": tt_sim.secret,
                "GREEKSD_TT_REFRESH": tt_sim.refresh_token,
                "GREEKSD_ARCHIVE_FLUSH_MS": "50",
                **(env or {}),
            },
            dotenv_path=data_dir / "none.env",
        )
        async with open_service(settings, build_sources(settings)) as service:
            await while_running(service)
        return set(tt_sim.quote_tokens)


def ticking(service: RunningService, ticks: int) -> Callable[[], bool]:
    streams = service.state.supervisor.registry
    return lambda: all(name in streams and streams[name].ticks >= ticks for name in SOURCES)


def concatenated(files: list[Path], out: Path) -> Path:
    """A source's hour files as one file (gzip members concatenate): what `cat` makes."""
    out.write_bytes(b"".join(path.read_bytes() for path in files))
    return out


async def test_the_service_archives_every_frame_and_a_replay_stores_the_live_rows(
    db_url: str, other_db_url: str, tmp_path: Path
) -> None:
    seen: dict[str, object] = {}

    async def stream_a_while(service: RunningService) -> None:
        await wait_until(ticking(service, 60), timeout=30, what="ticks from both sources")
        archive = service.state.archive
        assert archive is not None
        await wait_until(lambda: archive.stats.records > 0, what="a flush")
        seen["status"] = await service.state.on_service_loop(service.state.status_json)
        seen["metrics"] = parse_prometheus(render(service.state))
        seen["archive"] = archive

    tokens = await run_service(db_url, tmp_path, stream_a_while)
    live_rows = fetch_rows(db_url, ROWS)
    assert live_rows

    status = seen["status"]
    assert isinstance(status, dict) and status["archive"]["state"] == "ok"
    assert status["archive"]["records"] > 0 and status["archive"]["dropped"] == 0
    metrics = seen["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["greeksd_archive_records_total"] > 0
    assert metrics["greeksd_archive_dropped_total"] == 0
    assert metrics['greeksd_archive_state{state="ok"}'] == 1

    root = tmp_path / "archive"
    for source in SOURCES:
        files = source_files(root, source)
        assert files, source
        header, records = read_fixture(files[0])
        assert header["brokers"] == [source]
        kinds = [r.kind for r in records]
        assert kinds[0] == "link" and {"positions", "frame"} <= set(kinds)
        text = gzip.decompress(b"".join(f.read_bytes() for f in files)).decode()
        assert SIM_SECRET not in text and SIM_REFRESH not in text
        assert tokens and not any(token in text for token in tokens)

    # each source's archive, as `greeksd replay` reads it, stores the live rows
    for source in SOURCES:
        whole = concatenated(source_files(root, source), tmp_path / f"{source}.jsonl.gz")
        stats = await replay_fixture(other_db_url, whole)
        assert stats.frames > 0 and stats.rejected_records == 0
    assert fetch_rows(other_db_url, ROWS) == live_rows
    archive = seen["archive"]
    assert isinstance(archive, Archive) and archive.stats.dropped == 0


async def frames_command(
    data_dir: Path, source: str, key: str, at: datetime, *options: str
) -> subprocess.CompletedProcess[bytes]:
    """`greeksd archive frames` as a user runs it."""
    args = ["archive", "frames", "--source", source, "--contract", key, "--at", at.isoformat()]
    return await trio.run_process(
        [sys.executable, "-m", "greeksd.cli", *args, *options],
        env={**os.environ, "GREEKSD_DATA_DIR": str(data_dir), "GREEKSD_LOG_LEVEL": "ERROR"},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_the_frames_command_prints_the_frame_of_a_stored_row(
    db_url: str, tmp_path: Path
) -> None:
    async def stream_a_while(service: RunningService) -> None:
        await wait_until(ticking(service, 40), timeout=30, what="ticks from both sources")

    await run_service(db_url, tmp_path, stream_a_while)
    for source in SOURCES:
        (key, received_at, delta), *_ = fetch_rows(
            db_url,
            "SELECT contract_key, received_at, delta FROM greek_snapshots WHERE source = %s"
            " AND delta IS NOT NULL ORDER BY received_at DESC LIMIT 1 OFFSET 5",
            (source,),
        )
        done = await frames_command(tmp_path, source, key, received_at, "--window-s", "1")
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        matches = [orjson.loads(line) for line in done.stdout.decode().splitlines()]
        exact = [m for m in matches if m["exact"]]
        assert len(exact) == 1, matches
        (frame,) = exact
        assert datetime.fromisoformat(frame["frame"]["t"]) == received_at
        assert frame["frame"]["k"] == "frame" and frame["link"]["k"] == "link"
        assert any(r["contract_key"] == key and r["delta"] == delta for r in frame["rows"])
        for match in matches:  # context: only frames that yielded the contract's rows
            assert {r["contract_key"] for r in match["rows"]} == {key}
            gap = abs(datetime.fromisoformat(match["frame"]["t"]) - received_at)
            assert gap <= timedelta(seconds=1)

        missing = await frames_command(tmp_path, source, key, received_at + timedelta(hours=5))
        assert missing.returncode == 1 and b"no frame of" in missing.stderr


# ---- rotation, retention, crash tail: the Archive driven directly ------------------------
FRAME = '{"topic":"smd+1","31":"1.5"}'


def records_of(path: Path) -> list[tuple[str, bool, str | None]]:
    _, records = read_fixture(path)
    return [(r.kind, bool(r.body.get("resumed")), r.body.get("d")) for r in records]


def test_files_rotate_hourly_restate_the_open_link_and_old_ones_are_pruned(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    start = datetime(2024, 3, 10, 9, 58, tzinfo=UTC)
    now = [start]
    old = root / "ibkr" / "2024-03-02T23.jsonl.gz"  # ended more than 7 days before 10:00
    kept = root / "ibkr" / "2024-03-03T10.jsonl.gz"  # ends after 7 days before 10:01
    for path in (old, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b'{"fixture":"greeksd","version":1}\n'))
    archive = Archive(root, retention_days=7, clock=lambda: now[0])

    archive.link("ibkr", start, max_lines=100)
    archive.positions("ibkr", [], start)
    archive.frame("ibkr", FRAME, start + timedelta(seconds=1))
    archive.flush()
    assert old.exists() and kept.exists()  # nothing pruned without a new hour

    now[0] = start + timedelta(minutes=3)  # 10:01
    archive.frame("ibkr", FRAME.replace("1.5", "1.6"), now[0])
    archive.frame("ibkr", b"\x00\x01", now[0] + timedelta(seconds=1))
    archive.close()

    first, second = source_files(root, "ibkr")[-2:]
    assert (first.name, second.name) == ("2024-03-10T09.jsonl.gz", "2024-03-10T10.jsonl.gz")
    assert records_of(first) == [
        ("link", False, None),
        ("positions", False, None),
        ("frame", False, FRAME),
    ]
    assert records_of(second) == [
        ("link", True, None),
        ("positions", True, None),
        ("frame", False, FRAME.replace("1.5", "1.6")),
        ("frame", False, None),
    ]
    assert not old.exists() and kept.exists()
    assert archive.stats.pruned == 1 and archive.stats.records == 5

    # a later run in the same hour never appends to a file a crash may have cut short
    again = Archive(root, retention_days=7, clock=lambda: now[0])
    again.frame("ibkr", FRAME, now[0] + timedelta(seconds=2))
    again.close()
    assert source_files(root, "ibkr")[-1].name == "2024-03-10T10.1.jsonl.gz"


def records_line(at: datetime) -> bytes:
    return orjson.dumps({"t": at.isoformat(), "b": "ibkr", "k": "frame", "d": FRAME}) + b"\n"


def test_replay_reads_a_torn_tail_and_ignores_a_resumed_link_it_already_holds(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    hour = datetime(2024, 3, 10, 9, 59, 59, tzinfo=UTC)
    archive = Archive(root, retention_days=0)  # 2024 files: keep them
    archive.link("ibkr", hour)
    archive.frame("ibkr", FRAME, hour)
    archive.frame("ibkr", FRAME, hour + timedelta(seconds=2))
    archive.close()
    files = source_files(root, "ibkr")
    both = concatenated(files, tmp_path / "both.jsonl.gz")
    _, records = read_fixture(both)  # the second header is skipped, both links are read
    assert [(r.kind, bool(r.body.get("resumed"))) for r in records] == [
        ("link", False),
        ("frame", False),
        ("link", True),
        ("frame", False),
    ]

    torn = tmp_path / "torn.jsonl.gz"
    data = files[0].read_bytes()
    member = gzip.compress(records_line(hour + timedelta(seconds=1)))
    torn.write_bytes(data + member[:12])  # a crash while the next member was written
    _, records = read_fixture(torn)
    assert [r.kind for r in records] == ["link", "frame"]
    assert records.rejected == 1


def test_fan_out_archives_while_a_fixture_records(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    at = datetime.now(UTC)
    with FixtureWriter(tmp_path / "fixture.jsonl", ["ibkr"]) as fixture:
        both = FanOut(fixture, archive)
        both.link("ibkr", at)
        both.frame("ibkr", FRAME, at)
    archive.close()
    assert fixture.counts == {"link": 1, "frame": 1}
    assert records_of(tmp_path / "fixture.jsonl") == records_of(
        source_files(tmp_path / "archive", "ibkr")[0]
    )


# ---- a full disk -------------------------------------------------------------------------
async def test_a_full_disk_degrades_the_archive_while_rows_keep_flowing(
    db_url: str,
    tmpfs: Tmpfs,  # noqa: F811 - the fixture imported above
) -> None:
    async def fill_the_disk(service: RunningService) -> None:
        archive = service.state.archive
        assert archive is not None
        await wait_until(lambda: archive.stats.records > 0, timeout=30, what="archived frames")
        filler = tmpfs.fill()
        await wait_until(lambda: archive.stats.state == "failing", what="archive failing")
        status = await service.state.on_service_loop(service.state.status_json)
        assert status["archive"]["state"] == "failing"
        assert "No space left" in status["archive"]["last_error"]
        metrics = parse_prometheus(render(service.state))
        assert metrics["greeksd_archive_errors_total"] >= 1
        assert metrics["greeksd_archive_dropped_total"] >= 1
        assert metrics['greeksd_archive_state{state="failing"}'] == 1

        rows = count_rows(db_url)  # the database path does not care
        await wait_until(lambda: count_rows(db_url) > rows + 50, what="rows while failing")
        assert all(s.ticks > 0 for s in service.state.supervisor.registry.values())

        filler.unlink()  # the disk frees: the archive resumes by itself
        await wait_until(lambda: archive.stats.state == "ok", what="archive recovered")
        dropped = archive.stats.dropped
        records = archive.stats.records
        await wait_until(lambda: archive.stats.records > records, what="archiving again")
        assert archive.stats.dropped == dropped

    await run_service(db_url, tmpfs.path, fill_the_disk)
    # the source whose write the disk refused went on in a new file, which restates the
    # open connection and so replays on its own
    root = tmpfs.path / "archive"
    restarted = [files for files in (source_files(root, s) for s in SOURCES) if len(files) > 1]
    assert restarted
    for files in restarted:
        _, records = read_fixture(files[-1])
        first = next(iter(records))
        assert first.kind == "link" and first.body["resumed"] is True
