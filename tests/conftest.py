"""Real PostgreSQL for every test: the embedded server (started once per session, or once
per pytest-xdist worker, in a temporary directory) or the server named by
GREEKSD_TEST_DATABASE_URL. Each test gets its own database cloned from a migrated
template, so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from greeksd.logs import configure_logging
from greeksd.store.database import EmbeddedPostgres, embedded_postgres
from greeksd.store.migrations import migrate

# One template per xdist worker: workers sharing a GREEKSD_TEST_DATABASE_URL server must
# not drop and recreate each other's template.
TEMPLATE = f"greeksd_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"

configure_logging("DEBUG" if os.environ.get("GREEKSD_TEST_DEBUG") else "INFO")


def _with_database(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


def _create_database(conn: psycopg.Connection, prefix: str, template: str | None) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    conn.execute(create)
    return name


def _drop_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def _admin(server_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        yield conn


@contextlib.contextmanager
def _started_copy(pgdata: Path, prefix: str) -> Iterator[EmbeddedPostgres]:
    """A server started on a copy of the stopped data directory `pgdata`, in a directory
    of its own (not pytest's basetemp: pytest prunes old basetemps, which would pull the
    data directory out from under a server another pytest run still uses)."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        # cp -a keeps the owner and modes PostgreSQL insists on (run as root, the
        # embedded server runs as a user of its own).
        subprocess.run(["cp", "-a", str(pgdata), str(data_dir / "pg")], check=True)
        with embedded_postgres(data_dir) as server:
            yield server
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_pgdata() -> Iterator[Path]:
    """An initialised, migrated and stopped data directory, run through initdb once per
    session (per worker): starting a copy of it takes a tenth of the second initdb and
    the migrations take."""
    data_dir = Path(tempfile.mkdtemp(prefix="greeksd-test-pgdata-"))
    try:
        with embedded_postgres(data_dir) as server:
            migrate(server.url)
        yield data_dir / "pg"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_server(request: pytest.FixtureRequest) -> Iterator[EmbeddedPostgres | None]:
    """The embedded server, or None when GREEKSD_TEST_DATABASE_URL names another one."""
    if os.environ.get("GREEKSD_TEST_DATABASE_URL"):
        yield None
        return
    pgdata: Path = request.getfixturevalue("migrated_pgdata")
    with _started_copy(pgdata, "greeksd-test-pg-") as server:
        yield server


@pytest.fixture(scope="session")
def server_url(embedded_server: EmbeddedPostgres | None) -> str:
    external = os.environ.get("GREEKSD_TEST_DATABASE_URL")
    url = external or (embedded_server.url if embedded_server else "")
    admin = _with_database(url, "postgres")
    with _admin(admin) as conn:
        _drop_database(conn, TEMPLATE)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    migrate(_with_database(url, TEMPLATE))
    return admin


@pytest.fixture
def own_server(migrated_pgdata: Path) -> Iterator[EmbeddedPostgres]:
    """A migrated server of this test's own, so stopping or freezing it cannot disturb
    any other test."""
    with _started_copy(migrated_pgdata, "greeksd-own-pg-") as server:
        yield server
        if not server.is_running():
            server.start()


def _fresh_database(server_url: str) -> Iterator[str]:
    with _admin(server_url) as conn:
        name = _create_database(conn, "greeksd_test", TEMPLATE)
    yield _with_database(server_url, name)
    with _admin(server_url) as conn:
        _drop_database(conn, name)


@pytest.fixture
def db_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    yield from _fresh_database(server_url)


@pytest.fixture
def other_db_url(server_url: str) -> Iterator[str]:
    """A second fresh, migrated database (e.g. live run in one, replay in the other)."""
    yield from _fresh_database(server_url)


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A database with no schema at all, for migration tests."""
    with _admin(server_url) as conn:
        name = _create_database(conn, "greeksd_empty", None)
    yield _with_database(server_url, name)
    with _admin(server_url) as conn:
        _drop_database(conn, name)
