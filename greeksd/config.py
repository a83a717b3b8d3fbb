"""All settings, from the environment (prefix GREEKSD_) and an optional `.env`.

One table (`SETTINGS`) drives parsing, validation, defaults and the README's list, so a
setting cannot exist in one place and be missing from another.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import platformdirs
from dotenv import dotenv_values
from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict

from greeksd.redact import database_passwords, mask_quoted

PREFIX = "GREEKSD_"


class ConfigError(ValueError):
    """A setting has a value greeksd cannot use; the message names the variable."""


def _int_at_least(minimum: int, maximum: int, wanted: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be {wanted}") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"must be {wanted}")
        return value

    return parse


_positive_int = _int_at_least(1, 2**31 - 1, "a positive integer")
_non_negative_int = _int_at_least(0, 2**31 - 1, "zero or a positive integer")
_port = _int_at_least(0, 65535, "a TCP port 0-65535")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a positive number") from None
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def parse_brokers(text: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in {"ibkr", "tastytrade", "synthetic"}]
    if unknown:
        raise ValueError(f"unknown broker(s) {', '.join(unknown)}; use ibkr, tastytrade")
    return names


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None


_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_URL_SHAPE = "postgresql://user:password@host:port/dbname"


def parse_database_url(text: str) -> str | None:
    """A libpq connection string (`postgresql://`/`postgres://` URL or key=value pairs),
    checked here so a typo stops start-up with one line instead of a traceback that
    prints the URL, password included, when the first connection is attempted."""
    if not text:
        return None
    url = _URL_SCHEME.match(text)
    if url and url.group(1) not in {"postgresql", "postgres"}:  # libpq: case-sensitive
        scheme = url.group(1)
        hint = " (a SQLAlchemy driver suffix)" if "+" in scheme else ""
        raise ValueError(f"scheme {scheme!r} is not supported{hint}; use {_URL_SHAPE}")
    try:
        conninfo_to_dict(text)
    except PsycopgError as exc:
        # libpq quotes pieces of the string it choked on; any of them may be the password
        raise ValueError(
            f"not a PostgreSQL URL or key=value connection string "
            f"({mask_quoted(str(exc).strip())}); use {_URL_SHAPE}"
        ) from None
    return text


def _default_data_dir() -> str:
    return platformdirs.user_data_dir("greeksd")


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | Callable[[], str]
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DATABASE_URL",
        "",
        parse_database_url,
        "PostgreSQL URL (`postgresql://…`, `postgres://…` or libpq key=value pairs); "
        "unset starts an embedded PostgreSQL under DATA_DIR",
        secret=True,
    ),
    Setting(
        "DATA_DIR",
        _default_data_dir,
        lambda t: Path(t).expanduser(),
        "where the embedded database (`pg/`) and the disk spool (`spool/`) live",
    ),
    Setting("API_HOST", "127.0.0.1", str, "HTTP bind address"),
    Setting("API_PORT", "8765", _port, "HTTP port (0 = pick a free one)"),
    Setting(
        "API_TOKEN",
        "",
        _optional_str,
        "bearer token for mutating routes; required when API_HOST is not loopback",
        secret=True,
    ),
    Setting("FLUSH_ROWS", "1000", _positive_int, "writer flushes a batch at this many rows"),
    Setting("FLUSH_MS", "25", _positive_int, "... or this many ms after the batch's first row"),
    Setting(
        "QUEUE_SIZE",
        "100000",
        _positive_int,
        "snapshots the channel to the writer holds before conflating per contract",
    ),
    Setting(
        "SPOOL_MAX_MB",
        "1024",
        _positive_int,
        "cap of the disk spool that holds batches while the database is unreachable",
    ),
    Setting(
        "DB_TIMEOUT_S",
        "5",
        _positive_float,
        "how long a database call may take before the database counts as down (statement "
        "timeout; the client gives up 1 s later; also connect and TCP timeouts)",
    ),
    Setting("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting(
        "LATENCY_SLO_MS",
        "500",
        _positive_int,
        "warn when p95 write latency over the last minute exceeds this",
    ),
    Setting(
        "PARTITION_DAYS_AHEAD", "3", _non_negative_int, "daily partitions created ahead of today"
    ),
    Setting(
        "RETENTION_DAYS",
        "0",
        _non_negative_int,
        "drop daily partitions older than this many days; 0 keeps everything",
    ),
    Setting("BROKERS", "ibkr,tastytrade", parse_brokers, "streams `greeksd run` starts"),
    Setting("IBKR_URL", "https://localhost:5000", str, "Client Portal Gateway base URL"),
    Setting("IBKR_CA_FILE", "", _optional_path, "CA bundle to verify the gateway with"),
    Setting("IBKR_VERIFY_TLS", "0", _bool, "verify the gateway certificate even on localhost"),
    Setting("IBKR_HEARTBEAT_S", "60", _positive_float, "seconds between websocket `tic`s"),
    Setting(
        "IBKR_POSITIONS_REFRESH_S", "60", _positive_float, "seconds between IBKR position refreshes"
    ),
    Setting(
        "IBKR_MAX_LINES",
        "100",
        _positive_int,
        "concurrent market-data lines the IBKR account allows",
    ),
    Setting("TT_SECRET", "", _optional_str, "Tastytrade OAuth provider secret", secret=True),
    Setting("TT_REFRESH", "", _optional_str, "Tastytrade OAuth refresh token", secret=True),
    Setting("TT_ACCOUNT", "", _optional_str, "Tastytrade account number (unset: every account)"),
    Setting("TT_API_URL", "", _optional_str, "Tastytrade REST base URL override (the simulator)"),
    Setting(
        "TT_POSITIONS_REFRESH_S",
        "60",
        _positive_float,
        "seconds between Tastytrade position refreshes",
    ),
)


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    data_dir: Path
    api_host: str
    api_port: int
    api_token: str | None
    flush_rows: int
    flush_ms: int
    queue_size: int
    spool_max_mb: int
    db_timeout_s: float
    log_level: str
    latency_slo_ms: int
    partition_days_ahead: int
    retention_days: int
    brokers: tuple[str, ...]
    ibkr_url: str
    ibkr_ca_file: Path | None
    ibkr_verify_tls: bool
    ibkr_heartbeat_s: float
    ibkr_positions_refresh_s: float
    ibkr_max_lines: int
    tt_secret: str | None
    tt_refresh: str | None
    tt_account: str | None
    tt_api_url: str | None
    tt_positions_refresh_s: float

    def secrets(self) -> list[str]:
        """Values that must never reach a log line, a status payload or an error."""
        values = [self.api_token, self.tt_secret, self.tt_refresh]
        if self.database_url:
            values.extend(database_passwords(self.database_url))
        return [value for value in values if value]


def load_settings(
    environ: Mapping[str, str] | None = None, *, dotenv_path: Path | None = None
) -> Settings:
    """Read settings; the process environment wins over `.env`. Raises ConfigError."""
    env: dict[str, str] = {}
    dotenv_file = dotenv_path or Path.cwd() / ".env"
    if dotenv_file.is_file():
        env.update({k: v for k, v in dotenv_values(dotenv_file).items() if v is not None})
    env.update(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        variable = PREFIX + setting.name
        raw = env.get(variable)
        if raw is None:
            raw = setting.default() if callable(setting.default) else setting.default
        try:
            values[setting.name.lower()] = setting.parse(raw.strip())
        except ValueError as exc:
            shown = "<redacted>" if setting.secret else repr(raw)
            raise ConfigError(f"invalid {variable}={shown}: {exc}") from None
    assert {f.name for f in fields(Settings)} == set(values), "SETTINGS and Settings diverge"
    return Settings(**values)
