"""A real run with every secret configured, failures included, logs none of them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import trio

from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from tests.helpers import wait_until

DB_PASSWORD = "pw-Hunter2-db"
API_TOKEN = "tok-9f8e7d6c5b4a"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_logs_of_a_run_with_secrets_contain_none_of_them(db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    url_with_password = psycopg.conninfo.make_conninfo(db_url, password=DB_PASSWORD)
    async with open_ibkr_sim(tick_interval=0.05) as ibkr, open_tastytrade_sim() as tt:
        sessions = {ibkr._session}
        env = {k: v for k, v in os.environ.items() if not k.startswith("GREEKSD_")}
        env.update(
            GREEKSD_DATABASE_URL=url_with_password,
            GREEKSD_API_TOKEN=API_TOKEN,
            GREEKSD_API_PORT=str(port),
            GREEKSD_LOG_LEVEL="DEBUG",
            GREEKSD_DATA_DIR=str(tmp_path),
            GREEKSD_BROKERS="ibkr,tastytrade",
            GREEKSD_IBKR_URL=ibkr.url,
            GREEKSD_TT_API_URL=tt.api_url,
            GREEKSD_TT_SECRET=tt.secret,
            GREEKSD_TT_REFRESH=tt.refresh_token,
        )
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting does not block; reads run in a thread
            [sys.executable, "-m", "greeksd.cli", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def both_writing() -> bool:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/v1/streaming/status").json()
            except httpx.TransportError:
                return False
            return all(s["ticks"] > 0 for s in status["streams"].values())

        try:
            await wait_until(both_writing, timeout=30, what="both brokers writing")
            # Failures are where secrets tend to leak: refused tokens, expired sessions.
            tt.refuse_tokens(True)
            await tt.drop()
            ibkr.expire_session()
            await wait_until(lambda: tt.quote_token_requests >= 2, what="token re-fetch")
            tt.refuse_tokens(False)
            ibkr.restore()
            sessions.add(ibkr._session)
            await wait_until(both_writing, timeout=30, what="recovered")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, logs = await trio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 0, logs
    assert "event=service_started" in logs
    secrets = {
        DB_PASSWORD,
        API_TOKEN,
        tt.secret,
        tt.refresh_token,
        *sessions,
        *tt.access_tokens,
        *tt.quote_tokens,
    }
    assert tt.access_tokens and tt.quote_tokens and len(sessions) == 2, "secrets were in play"
    leaked = sorted(s for s in secrets if s in logs)
    assert not leaked, f"secrets in logs: {leaked}"
