"""`greeksd demo --duration S`: both simulators, the real streams, the service, a clean
end with a summary, and rows from both brokers for the same book."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import fetch_rows


def test_demo_runs_both_brokers_and_ends_cleanly(db_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GREEKSD_DATABASE_URL": db_url,
        "GREEKSD_API_PORT": "0",
        "GREEKSD_DATA_DIR": str(tmp_path),
        "GREEKSD_LOG_LEVEL": "WARNING",
    }
    done = subprocess.run(
        [sys.executable, "-m", "greeksd.cli", "demo", "--duration", "8", "--status-every", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("greeksd demo: dashboard at http://127.0.0.1:") for line in lines)
    status_lines = [line for line in lines if line.startswith("ibkr=")]
    assert len(status_lines) >= 2  # a status line every 2 s
    assert lines[-1].startswith("demo finished: ibkr=connected")
    assert "tastytrade=connected" in lines[-1]

    by_broker = dict(
        fetch_rows(
            db_url, "SELECT broker, count(DISTINCT contract_key) FROM greek_snapshots GROUP BY 1"
        )
    )
    assert set(by_broker) == {"ibkr", "tastytrade"}
    shared = fetch_rows(
        db_url,
        "SELECT count(*) FROM (SELECT contract_key FROM greek_snapshots GROUP BY 1"
        " HAVING count(DISTINCT broker) = 2) k",
    )
    assert shared[0][0] >= 5  # one book at both brokers: the risk timeline shows both
