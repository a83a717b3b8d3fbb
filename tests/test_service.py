"""The `greeksd` process as a user runs it: config errors, API, and SIGTERM shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from greeksd.store.partitions import ensure_partitions
from tests.helpers import count_rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEKSD_")}
    # Never the user's data dir: a spool left there would drain into this test's database.
    env["GREEKSD_DATA_DIR"] = tempfile.mkdtemp(prefix="greeksd-test-data-")
    env.update(overrides)
    return env


def _greeksd(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "greeksd.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _poll(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_for_status(
    port: int, predicate: object, proc: subprocess.Popen[str], timeout: float = 30.0
) -> dict:
    seen: list[dict] = []

    def reached() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"greeksd exited early: {proc.communicate()[1]}")
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/v1/streaming/status", timeout=2).json()
        except httpx.TransportError:
            return False
        seen.append(body)
        return bool(predicate(body))  # type: ignore[operator]

    _poll(reached, "status condition", timeout)
    return seen[-1]


def test_bad_flush_rows_exits_2_naming_the_variable(tmp_path: Path) -> None:
    proc = _greeksd("run", env=_env(GREEKSD_FLUSH_ROWS="lots"), cwd=tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "GREEKSD_FLUSH_ROWS" in err and "positive integer" in err
    assert len(err.strip().splitlines()) == 1, "one clear line"


def test_non_loopback_api_without_token_refuses_to_start(tmp_path: Path) -> None:
    proc = _greeksd("run", env=_env(GREEKSD_API_HOST="0.0.0.0"), cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "GREEKSD_API_TOKEN" in err


def _never_flushing(db_url: str, tmp_path: Path) -> tuple[int, dict[str, str]]:
    """A synthetic-source service whose batches never fill and never time out on their
    own: whatever reaches the database was flushed by the shutdown path."""
    port = _free_port()
    return port, _env(
        GREEKSD_DATABASE_URL=db_url,
        GREEKSD_API_PORT=str(port),
        GREEKSD_FLUSH_ROWS="1000000",
        GREEKSD_FLUSH_MS="3600000",
        GREEKSD_BROKERS="synthetic",
        GREEKSD_DATA_DIR=str(tmp_path),
    )


def test_sigterm_flushes_every_accepted_row_and_exits_0(db_url: str, tmp_path: Path) -> None:
    port, env = _never_flushing(db_url, tmp_path)
    proc = _greeksd("run", env=env, cwd=tmp_path)
    try:
        _wait_for_status(port, lambda s: s["streams"]["synthetic"]["ticks"] >= 20, proc)
        assert count_rows(db_url) == 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    accepted = int(re.search(r"event=service_stopped accepted=(\d+)", err).group(1))  # type: ignore[union-attr]
    assert accepted >= 20
    assert count_rows(db_url) == accepted


def test_second_signal_spools_every_unwritten_row_and_the_next_start_stores_them(
    db_url: str, tmp_path: Path
) -> None:
    port, env = _never_flushing(db_url, tmp_path)
    # Five-row batches under a table lock: the first flush hangs and every later row
    # waits in the channel, so the second signal finds rows in both places: a stuck
    # database at Ctrl-C, Ctrl-C. Today's partitions exist beforehand, so start-up needs
    # no lock on the table. A long DB timeout keeps the flush stuck for the whole test
    # (by default the statement timeout would end the wait after 5 s and spool the batch).
    env |= {
        "GREEKSD_FLUSH_ROWS": "5",
        "GREEKSD_PARTITION_DAYS_AHEAD": "1",
        "GREEKSD_DB_TIMEOUT_S": "120",
    }
    with psycopg.connect(db_url, autocommit=True) as setup:
        ensure_partitions(setup, datetime.now(UTC).date(), 1)
    with psycopg.connect(db_url) as lock, psycopg.connect(db_url, autocommit=True) as watch:
        lock.execute("LOCK TABLE greek_snapshots IN ACCESS EXCLUSIVE MODE")
        proc = _greeksd("run", env=env, cwd=tmp_path)
        try:
            _wait_for_status(port, lambda s: s["streams"]["synthetic"]["ticks"] >= 20, proc)

            def flush_blocked() -> bool:
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'greek_snapshots'::regclass"
                ).fetchone()
                return bool(row and row[0])

            def api_gone() -> bool:  # the first signal stopped the HTTP server
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                except httpx.TransportError:
                    return True
                return False

            _poll(flush_blocked, "the first flush to wait on the lock")
            proc.send_signal(signal.SIGTERM)
            _poll(api_gone, "the first SIGTERM to be handled")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            lock.rollback()
    assert proc.returncode == 130, err
    line = re.search(
        r"event=second_signal_exiting_now signal=SIGTERM accepted=(\d+) rows_written=(\d+)"
        r" spooled_rows=(\d+)",
        err,
    )
    assert line, err
    accepted, written, spooled = map(int, line.groups())
    assert accepted >= 20 and written == 0 and spooled == accepted
    assert count_rows(db_url) == 0  # the killed process never sent the COPY data

    # The next start drains the spool before anything else: every accepted row arrives.
    proc = _greeksd("run", env={**env, "GREEKSD_BROKERS": ""}, cwd=tmp_path)
    try:
        _wait_for_status(port, lambda s: s["writer"]["spool_bytes"] == 0, proc)
        assert count_rows(db_url) == accepted
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("path", ["/healthz", "/v1/streaming/status"])
def test_api_serves_json_on_loopback(db_url: str, tmp_path: Path, path: str) -> None:
    port = _free_port()
    env = _env(
        GREEKSD_DATABASE_URL=db_url,
        GREEKSD_API_PORT=str(port),
        GREEKSD_BROKERS="synthetic",
        GREEKSD_FLUSH_MS="50",
    )
    proc = _greeksd("run", env=env, cwd=tmp_path)
    try:
        status = _wait_for_status(port, lambda s: s["writer"]["rows_written"] > 0, proc)
        assert status["writer"]["latency_ms"]["p95"] is not None
        response = httpx.get(f"http://127.0.0.1:{port}{path}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        missing = httpx.get(f"http://127.0.0.1:{port}/no/such/route")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
