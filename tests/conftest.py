"""Real PostgreSQL for every test: the embedded server (started once per session in a
temporary directory) or the server named by GREEKSD_TEST_DATABASE_URL. Each test gets
its own database cloned from a migrated template, so tests never see each other's rows.
"""

from __future__ import annotations

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

TEMPLATE = "greeksd_test_template"

configure_logging("DEBUG" if os.environ.get("GREEKSD_TEST_DEBUG") else "INFO")


def _with_database(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[EmbeddedPostgres | None]:
    """The embedded server, or None when GREEKSD_TEST_DATABASE_URL names another one."""
    if os.environ.get("GREEKSD_TEST_DATABASE_URL"):
        yield None
        return
    # Our own directory, not pytest's basetemp: pytest prunes old basetemps, which would
    # pull the data directory out from under a server another pytest run still uses.
    data_dir = Path(tempfile.mkdtemp(prefix="greeksd-test-pg-"))
    try:
        with embedded_postgres(data_dir) as server:
            yield server
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url(embedded_server: EmbeddedPostgres | None) -> str:
    external = os.environ.get("GREEKSD_TEST_DATABASE_URL")
    url = external or (embedded_server.url if embedded_server else "")
    admin = _with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    migrate(_with_database(url, TEMPLATE))
    return admin


@pytest.fixture(scope="session")
def migrated_pgdata() -> Iterator[Path]:
    """An initialised, migrated and stopped data directory for `own_server` to copy:
    starting a copy takes a tenth of the second initdb and the migrations take."""
    data_dir = Path(tempfile.mkdtemp(prefix="greeksd-test-pgdata-"))
    try:
        with embedded_postgres(data_dir) as server:
            migrate(server.url)
        yield data_dir / "pg"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def own_server(migrated_pgdata: Path) -> Iterator[EmbeddedPostgres]:
    """A migrated server of this test's own, so stopping or freezing it cannot disturb
    any other test."""
    data_dir = Path(tempfile.mkdtemp(prefix="greeksd-own-pg-"))
    try:
        # cp -a keeps the owner and modes PostgreSQL insists on (run as root, the
        # embedded server runs as a user of its own).
        subprocess.run(["cp", "-a", str(migrated_pgdata), str(data_dir / "pg")], check=True)
        with embedded_postgres(data_dir) as server:
            yield server
            if not server.is_running():
                server.start()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def db_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    yield from _fresh_database(server_url)


@pytest.fixture
def other_db_url(server_url: str) -> Iterator[str]:
    """A second fresh, migrated database (e.g. live run in one, replay in the other)."""
    yield from _fresh_database(server_url)


def _fresh_database(server_url: str) -> Iterator[str]:
    name = f"greeksd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)
            )
        )
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A database with no schema at all, for migration tests."""
    name = f"greeksd_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
