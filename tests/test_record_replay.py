"""Record and replay: a fixture recorded from the real streams against both simulators
replays into exactly the rows the live run stored, and a second replay stores nothing."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import trio

from greeksd.fixtures import record_mixed_session
from greeksd.pipeline import open_pipeline
from greeksd.recording import FixtureError, read_fixture, scrub
from greeksd.replay import replay_fixture
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import SIM_REFRESH, SIM_SECRET, open_tastytrade_sim
from tests.helpers import count_rows, fetch_rows

FIXTURE = Path(__file__).parent / "fixtures" / "mixed-session.jsonl.gz"
ROWS = (
    "SELECT broker, account_id, contract_key, event_time, received_at, quantity, multiplier,"
    " delta, gamma, theta, vega, rho, implied_volatility, underlying_price, bid, ask, last,"
    " mark FROM greek_snapshots ORDER BY broker, account_id, contract_key, event_time,"
    " received_at, delta NULLS FIRST, gamma NULLS FIRST, vega NULLS FIRST"
)


async def test_replay_stores_exactly_the_rows_the_live_run_stored(
    db_url: str, other_db_url: str, tmp_path: Path
) -> None:
    fixture = tmp_path / "session.jsonl.gz"
    async with open_pipeline(db_url, flush_rows=200, flush_ms=50) as live:
        counts, statuses = await record_mixed_session(fixture, duration_s=8.0, sink=live.sink)
    live_rows = fetch_rows(db_url, ROWS)

    stats = await replay_fixture(other_db_url, fixture)
    replayed_rows = fetch_rows(other_db_url, ROWS)

    assert replayed_rows == live_rows
    assert stats.snapshots == live.sink.accepted == sum(s.ticks for s in statuses.values())
    assert stats.rows_written == live.writer.stats.rows_written == len(live_rows)
    assert stats.duplicates == live.writer.stats.duplicates >= 1  # the repeated DXLink frame
    assert stats.late == live.writer.stats.late >= 2  # one late event per broker
    assert stats.conflated == 0
    # what the schedule injected is all in the recording and came back out of it
    assert stats.frames == counts["frame"]
    assert set(stats.frames_by_broker) == {"ibkr", "tastytrade"}
    assert stats.links >= 4  # a connection per broker, then a reconnect each
    assert stats.malformed == sum(s.rejected_frames for s in statuses.values()) >= 6
    brokers_with_null_delta = {r[0] for r in replayed_rows if r[7] is None}
    assert brokers_with_null_delta == {"ibkr", "tastytrade"}  # IBKR clear, DXLink NaN
    keys = {(r[0], r[2]) for r in replayed_rows}
    opened = [k for k in keys if k[1].startswith("AAPL") and k[1].endswith("C 200")]
    assert {b for b, _ in opened} == {"ibkr", "tastytrade"}  # opened mid-session


async def test_committed_fixture_replays_once_then_only_duplicates(
    db_url: str, tmp_path: Path
) -> None:
    first = await replay_fixture(db_url, FIXTURE)
    stored = count_rows(db_url)
    assert first.frames >= 2000 and set(first.frames_by_broker) == {"ibkr", "tastytrade"}
    assert stored == first.rows_written > 0
    assert first.snapshots == first.rows_written + first.duplicates
    assert first.malformed >= 6 and first.late >= 2 and first.links >= 4
    futures = fetch_rows(
        db_url,
        "SELECT contract_key, count(DISTINCT broker), min(multiplier), max(multiplier)"
        " FROM greek_snapshots WHERE contract_key LIKE '/%%' GROUP BY 1",
    )
    assert len(futures) == 3  # the fixture's ES, CL and ZN options, one key each
    assert all(brokers == 2 and lo == hi for _, brokers, lo, hi in futures), futures

    second = await replay_fixture(db_url, FIXTURE)
    assert count_rows(db_url) == stored
    assert second.rows_written == 0
    assert second.duplicates == second.snapshots == first.snapshots


def _greeksd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "greeksd.cli", *args],
        env={**os.environ, "GREEKSD_LOG_LEVEL": "WARNING", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_command_prints_a_summary_and_is_idempotent(db_url: str, tmp_path: Path) -> None:
    env = {"GREEKSD_DATA_DIR": str(tmp_path)}
    first = _greeksd("replay", str(FIXTURE), "--database-url", db_url, env=env)
    assert first.returncode == 0, first.stderr
    summary = first.stdout.strip().splitlines()[-1]
    for word in ("frames=", "snapshots=", "written=", "duplicates=", "late=", "malformed="):
        assert word in summary
    assert "frames_per_s=" in summary and "wall_s=" in summary
    stored = count_rows(db_url)
    assert stored > 0 and f"written={stored} " in summary

    again = _greeksd("replay", str(FIXTURE), "--database-url", db_url, env=env)
    assert again.returncode == 0, again.stderr
    assert "written=0 " in again.stdout
    assert count_rows(db_url) == stored

    missing = _greeksd("replay", str(tmp_path / "nope.jsonl"), "--database-url", db_url, env=env)
    assert missing.returncode == 1 and "nope.jsonl" in missing.stderr


async def test_speed_one_keeps_the_recorded_pacing(db_url: str, tmp_path: Path) -> None:
    # the committed fixture's header and first 400 records, as a plain .jsonl
    lines = gzip.decompress(FIXTURE.read_bytes()).decode().splitlines(keepends=True)[:401]
    source = tmp_path / "paced.jsonl"
    source.write_text("".join(lines))
    _, records = read_fixture(source)
    times = [r.at for r in records]
    span = (times[-1] - times[0]).total_seconds()
    assert span > 0.5

    started = time.monotonic()
    paced = await replay_fixture(db_url, source, speed=1.0)
    assert time.monotonic() - started >= span
    fast = await replay_fixture(db_url, source, speed=0.0)
    assert fast.wall_s < span
    assert fast.duplicates == fast.snapshots == paced.snapshots > 0


async def test_record_command_captures_both_brokers_without_secrets(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    book = default_contracts(datetime.now(UTC).date(), 4)
    async with (
        open_ibkr_sim(book, tick_interval=0.02) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=0.05) as tt_sim,
    ):
        env = {
            **os.environ,
            "GREEKSD_BROKERS": "ibkr,tastytrade",
            "GREEKSD_IBKR_URL": ib_sim.url,
            "GREEKSD_TT_API_URL": tt_sim.api_url,
            "GREEKSD_TT_SECRET": tt_sim.secret,
            "GREEKSD_TT_REFRESH": tt_sim.refresh_token,
            "GREEKSD_DATA_DIR": str(tmp_path),
            "GREEKSD_LOG_LEVEL": "WARNING",
        }
        done = await trio.run_process(
            [sys.executable, "-m", "greeksd.cli", "record", "--out", str(out), "--duration", "4"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        quote_tokens = set(tt_sim.quote_tokens)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "recorded " in done.stdout.decode()
    header, records = read_fixture(out)
    assert header["brokers"] == ["ibkr", "tastytrade"]
    kinds = {(r.broker, r.kind) for r in records}
    assert {(b, k) for b in ("ibkr", "tastytrade") for k in ("link", "positions", "frame")} <= kinds
    text = out.read_text()
    assert quote_tokens and not any(token in text for token in quote_tokens)
    assert SIM_SECRET not in text and SIM_REFRESH not in text


def test_fixture_holds_no_secret_and_scrubs_tokens() -> None:
    text = gzip.decompress(FIXTURE.read_bytes()).decode()
    assert SIM_SECRET not in text and SIM_REFRESH not in text
    assert '"AUTH"' not in text and "Bearer" not in text
    assert "session" not in text  # no IBKR cookie or tickle session
    auth = orjson.loads(scrub('{"type":"AUTH","channel":0,"token":"abc.def.ghi"}'))
    assert auth == {"type": "AUTH", "channel": 0, "token": "***"}


def test_a_file_that_is_not_a_fixture_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.jsonl"
    bogus.write_text('{"hello": 1}\n')
    with pytest.raises(FixtureError, match="not a greeksd fixture"):
        read_fixture(bogus)
