"""All settings, from the environment (prefix GREEKSD_) and an optional `.env`.

One list (the `Settings` dataclass, each field carrying its table row) drives parsing,
validation, defaults, typed attribute access and the README's list (`SETTINGS`, read off
the fields), so a setting cannot exist in one place and be missing from another.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
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
    """One row of the settings table: the variable (without PREFIX), its default as the
    text an environment would hold, how that text is parsed and checked, the README's
    help line, and whether the value must never be shown."""

    name: str
    default: str | Callable[[], str]
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


# Defaults that code outside the service also uses (the pipeline, the writer, replay,
# benchmarks): named once here, so a constructor's default is the service's default.
FLUSH_ROWS = 1000
FLUSH_MS = 25
QUEUE_SIZE = 100_000
DB_TIMEOUT_S = 5.0
LATENCY_SLO_MS = 500


def _setting(
    default: str | Callable[[], str],
    parse: Callable[[str], Any],
    help: str,
    *,
    secret: bool = False,
) -> Any:
    """A `Settings` field with its table row in the field's metadata (the name comes
    from the field). Typed `Any` so mypy checks the field's annotation, not this."""
    return field(metadata={"setting": Setting("", default, parse, help, secret)})


@dataclass(frozen=True)
class Settings:
    """Every setting, in the README's order: the one list. Each field carries its table
    row (`_setting`), and `SETTINGS` is read off these fields, so a setting cannot exist
    in the table and not here (or the other way round), and attributes stay typed."""

    database_url: str | None = _setting(
        "",
        parse_database_url,
        "PostgreSQL URL (`postgresql://…`, `postgres://…` or libpq key=value pairs); "
        "unset starts an embedded PostgreSQL under DATA_DIR",
        secret=True,
    )
    data_dir: Path = _setting(
        _default_data_dir,
        lambda t: Path(t).expanduser(),
        "where the embedded database (`pg/`) and the disk spool (`spool/`) live",
    )
    api_host: str = _setting("127.0.0.1", str, "HTTP bind address")
    api_port: int = _setting("8765", _port, "HTTP port (0 = pick a free one)")
    api_token: str | None = _setting(
        "",
        _optional_str,
        "bearer token for mutating routes; required when API_HOST is not loopback",
        secret=True,
    )
    flush_rows: int = _setting(
        str(FLUSH_ROWS), _positive_int, "writer flushes a batch at this many rows"
    )
    flush_ms: int = _setting(
        str(FLUSH_MS), _positive_int, "... or this many ms after the batch's first row"
    )
    queue_size: int = _setting(
        str(QUEUE_SIZE),
        _positive_int,
        "snapshots the channel to the writer holds before conflating per contract",
    )
    spool_max_mb: int = _setting(
        "1024",
        _positive_int,
        "cap of the disk spool that holds batches while the database is unreachable",
    )
    db_timeout_s: float = _setting(
        f"{DB_TIMEOUT_S:g}",
        _positive_float,
        "how long a database call may take before the database counts as down (statement "
        "timeout; the client gives up 1 s later; also connect and TCP timeouts)",
    )
    log_level: str = _setting("INFO", _log_level, "DEBUG, INFO, WARNING or ERROR")
    latency_slo_ms: int = _setting(
        str(LATENCY_SLO_MS),
        _positive_int,
        "warn when p95 write latency over the last minute exceeds this",
    )
    partition_days_ahead: int = _setting(
        "3", _non_negative_int, "daily partitions created ahead of today"
    )
    retention_days: int = _setting(
        "0",
        _non_negative_int,
        "drop daily partitions older than this many days; 0 keeps everything",
    )
    brokers: tuple[str, ...] = _setting(
        "ibkr,tastytrade", parse_brokers, "streams `greeksd run` starts"
    )
    ibkr_url: str = _setting("https://localhost:5000", str, "Client Portal Gateway base URL")
    ibkr_ca_file: Path | None = _setting("", _optional_path, "CA bundle to verify the gateway with")
    ibkr_verify_tls: bool = _setting("0", _bool, "verify the gateway certificate even on localhost")
    ibkr_heartbeat_s: float = _setting("60", _positive_float, "seconds between websocket `tic`s")
    ibkr_positions_refresh_s: float = _setting(
        "60", _positive_float, "seconds between IBKR position refreshes"
    )
    ibkr_max_lines: int = _setting(
        "100", _positive_int, "concurrent market-data lines the IBKR account allows"
    )
    tt_secret: str | None = _setting(
        "", _optional_str, "Tastytrade OAuth provider secret", secret=True
    )
    tt_refresh: str | None = _setting(
        "", _optional_str, "Tastytrade OAuth refresh token", secret=True
    )
    tt_account: str | None = _setting(
        "", _optional_str, "Tastytrade account number (unset: every account)"
    )
    tt_api_url: str | None = _setting(
        "", _optional_str, "Tastytrade REST base URL override (the simulator)"
    )
    tt_positions_refresh_s: float = _setting(
        "60", _positive_float, "seconds between Tastytrade position refreshes"
    )

    def secrets(self) -> list[str]:
        """Values that must never reach a log line, a status payload or an error."""
        values = [self.api_token, self.tt_secret, self.tt_refresh]
        if self.database_url:
            values.extend(database_passwords(self.database_url))
        return [value for value in values if value]


def settings_table(cls: type[Any]) -> tuple[Setting, ...]:
    """The table rows carried by `cls`'s fields, named after them. A field without a
    row is an error at import, so no setting can be half-declared."""
    rows = []
    for f in fields(cls):
        row = f.metadata.get("setting")
        if not isinstance(row, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} has no settings-table row (_setting)")
        rows.append(replace(row, name=f.name.upper()))
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = settings_table(Settings)


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
    return Settings(**values)
