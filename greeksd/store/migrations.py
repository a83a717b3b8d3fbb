"""Plain-SQL migrations from `schema/`, applied in file-name order, each in its own
transaction, recorded in `schema_migrations`. Re-running is a no-op.

Several instances may start together on one database: each migration's transaction
holds the schema lock (greeksd.store.ddl_lock) and re-reads what is applied under it,
so each migration is applied once, by whichever instance gets there first."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import psycopg

from greeksd.logs import get_logger
from greeksd.store.ddl_lock import LOCK_WAIT_S, schema_transaction

log = get_logger("greeksd.store")

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(schema_dir: Path = SCHEMA_DIR) -> list[Migration]:
    if not schema_dir.is_dir():
        raise MigrationError(f"schema directory not found: {schema_dir}")
    return [Migration(p.stem, p) for p in sorted(schema_dir.glob("*.sql"))]


def applied(conn: psycopg.Connection) -> dict[str, str]:
    """version -> checksum of what the database has; empty on a fresh database."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    return {version: checksum for version, checksum in rows}


def migrate(
    url: str, schema_dir: Path = SCHEMA_DIR, *, lock_wait_s: float = LOCK_WAIT_S
) -> list[str]:
    """Apply pending migrations; return the versions applied now (by this call: another
    instance may have applied the rest). Waits at most `lock_wait_s` for another
    instance's migration (SchemaLockBusy after that); the migrations themselves have no
    time limit (one may legitimately take long)."""
    migrations = discover(schema_dir)
    done_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        with schema_transaction(conn, lock_wait_s, "migrations"):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for migration in migrations:
            with schema_transaction(conn, lock_wait_s, f"migration {migration.version}"):
                have = applied(conn)
                if migration.version in have:
                    if have[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"{migration.path.name} changed after it was applied; "
                            "add a new migration file instead of editing an applied one"
                        )
                    continue
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                    (migration.version, migration.checksum),
                )
            log.info("migration_applied", version=migration.version)
            done_now.append(migration.version)
    return done_now


def status(url: str, schema_dir: Path = SCHEMA_DIR) -> list[tuple[str, bool]]:
    """(version, applied?) for every migration file."""
    with psycopg.connect(url) as conn:
        have = applied(conn)
    return [(m.version, m.version in have) for m in discover(schema_dir)]
