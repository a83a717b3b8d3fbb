"""All settings, from the environment (prefix GREEKSD_), an optional `.env` and an
optional settings file (greeksd.settings_file: top-level settings and named sources).

One list drives parsing, validation, defaults, typed attribute access and the README's
table: the service's own variables are the fields of `Settings` (each carrying its
table row, greeksd.settings_table), and each registered broker brings its own settings
dataclass (`GREEKSD_<prefix>*`, greeksd.brokers.registry), held in `Settings.per_broker`.
So a setting cannot exist in one place and be missing from another, and adding a broker
adds its variables without touching this module.

Precedence: the process environment, then `.env`, then the settings file, then the
defaults. The environment reaches the service's settings and each broker's default
source (`GREEKSD_<prefix>*`); a named source (`ibkr:alice`) is configured by its file
entry alone, so one variable cannot silently apply to every login of a broker.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import platformdirs
from dotenv import dotenv_values
from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict

from greeksd.brokers import registry
from greeksd.brokers.spec import BrokerSpec
from greeksd.coverage import DEFAULT_STALE_S
from greeksd.redact import database_passwords, mask_quoted
from greeksd.settings_file import SettingsFile, read_settings_file, settings_file_path
from greeksd.settings_table import (
    NOT_A_ROW,
    PREFIX,
    ConfigError,
    Setting,
    boolean,
    non_negative_float,
    non_negative_int,
    optional_path,
    optional_str,
    port,
    positive_float,
    positive_int,
    read_table,
    read_values,
    setting,
    settings_table,
    table_secrets,
)
from greeksd.sources import SourceConfig, broker_of, parse_instance, parse_source, source_name

S = TypeVar("S")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def parse_brokers(text: str) -> tuple[str, ...]:
    """Broker names, each one the registry knows."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [name for name in names if registry.get(name) is None]
    if unknown:
        raise ValueError(
            f"unknown broker(s) {', '.join(unknown)}; use {', '.join(registry.names())}"
        )
    return names


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


def _host_name() -> str:
    return socket.gethostname() or "greeksd"


def _default_data_dir() -> str:
    return platformdirs.user_data_dir("greeksd")


# Defaults that code outside the service also uses (the pipeline, the writer, replay,
# benchmarks): named once here, so a constructor's default is the service's default.
FLUSH_ROWS = 1000
FLUSH_MS = 25
QUEUE_SIZE = 100_000
DB_TIMEOUT_S = 5.0
LATENCY_SLO_MS = 500
ARCHIVE_FLUSH_MS = 1000
ARCHIVE_RETENTION_DAYS = 7
STORE_PAYLOAD = False
COMPACT_PARTITIONS = True


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, in the README's order: the one list. Each field
    carries its table row (`setting`), and `SETTINGS` is read off these fields, so a
    setting cannot exist in the table and not here (or the other way round), and
    attributes stay typed. Each broker's own settings are in `per_broker`."""

    config_file: Path | None = setting(
        "",
        optional_path,
        "settings file (TOML: top-level settings and `[[sources]]`, see Named sources); "
        "unset reads `./greeksd.toml` if it exists",
    )
    instance: str = setting(
        _host_name,
        parse_instance,
        "this instance's name: status shows it, every row it writes carries it "
        "(default: the host name)",
    )
    database_url: str | None = setting(
        "",
        parse_database_url,
        "PostgreSQL URL (`postgresql://…`, `postgres://…` or libpq key=value pairs); "
        "unset starts an embedded PostgreSQL under DATA_DIR",
        secret=True,
    )
    data_dir: Path = setting(
        _default_data_dir,
        lambda t: Path(t).expanduser(),
        "where the embedded database (`pg/`), the disk spool (`spool/`) and the raw-frame "
        "archive (`archive/`) live",
    )
    api_host: str = setting("127.0.0.1", str, "HTTP bind address")
    api_port: int = setting("8765", port, "HTTP port (0 = pick a free one)")
    api_token: str | None = setting(
        "",
        optional_str,
        "bearer token for mutating routes; required when API_HOST is not loopback",
        secret=True,
    )
    flush_rows: int = setting(
        str(FLUSH_ROWS), positive_int, "writer flushes a batch at this many rows"
    )
    flush_ms: int = setting(
        str(FLUSH_MS), positive_int, "... or this many ms after the batch's first row"
    )
    queue_size: int = setting(
        str(QUEUE_SIZE),
        positive_int,
        "snapshots the channel to the writer holds before conflating per contract",
    )
    spool_max_mb: int = setting(
        "1024",
        positive_int,
        "cap of the disk spool that holds batches while the database is unreachable",
    )
    archive: bool = setting(
        "1",
        boolean,
        "keep every inbound frame of every source in hourly compressed files under "
        "DATA_DIR/archive (see Raw-frame archive); 0 turns it off",
    )
    archive_retention_days: int = setting(
        str(ARCHIVE_RETENTION_DAYS),
        non_negative_int,
        "delete archive files whose hour ended more than this many days ago; 0 keeps everything",
    )
    archive_flush_ms: int = setting(
        str(ARCHIVE_FLUSH_MS),
        positive_int,
        "the archive writes and fsyncs a compressed member this often (or at 10,000 "
        "frames): what a crash can lose at most",
    )
    db_timeout_s: float = setting(
        f"{DB_TIMEOUT_S:g}",
        positive_float,
        "how long a database call may take before the database counts as down (statement "
        "timeout; the client gives up 1 s later; also connect and TCP timeouts)",
    )
    log_level: str = setting("INFO", _log_level, "DEBUG, INFO, WARNING or ERROR")
    latency_slo_ms: int = setting(
        str(LATENCY_SLO_MS),
        positive_int,
        "warn when p95 write latency over the last minute exceeds this",
    )
    partition_days_ahead: int = setting(
        "3", non_negative_int, "daily partitions created ahead of today"
    )
    store_payload: bool = setting(
        str(int(STORE_PAYLOAD)),
        boolean,
        "store each snapshot's raw broker event in `source_payload` (jsonb, about 250 bytes "
        "a row, more than the rest of the row); off: NULL, and the Connections do not even "
        "build it",
    )
    compact_partitions: bool = setting(
        str(int(COMPACT_PARTITIONS)),
        boolean,
        "rebuild a daily partition's indexes packed once it is closed (an hour after its "
        "day ends) and after `greeksd replay` loads one: REINDEX CONCURRENTLY, reads and "
        "writes go on; ~58 bytes a row less (see Performance); 0 turns it off",
    )
    retention_days: int = setting(
        "0",
        non_negative_int,
        "drop daily partitions older than this many days; 0 keeps everything",
    )
    stale_s: float = setting(
        f"{DEFAULT_STALE_S:g}",
        non_negative_float,
        "a contract's Greeks older than this many seconds are `stale`; a link up this long "
        "with no fresh Greeks is `degraded` (see Coverage), and the risk timeline counts it "
        "`missing`; 0 turns staleness off",
    )
    brokers: tuple[str, ...] = setting(
        "ibkr,tastytrade",
        parse_brokers,
        "brokers whose default source `greeksd run` starts (default when the settings "
        "file has `[[sources]]`: its default sources only)",
    )
    per_broker: Mapping[str, Any] = field(
        default_factory=dict, metadata={NOT_A_ROW: "each broker's spec (greeksd.brokers)"}
    )
    """Each registered broker's default source's settings, by name (see `broker`)."""
    named: tuple[SourceConfig, ...] = field(
        default=(), metadata={NOT_A_ROW: "the settings file's named sources"}
    )
    """The settings file's named sources (`<broker>:<name>`), in file order."""
    warnings: tuple[str, ...] = field(default=(), metadata={NOT_A_ROW: "not a setting"})
    """What reading the settings showed that is worth a warning (logged at start)."""

    def broker(self, spec: BrokerSpec[S]) -> S:
        """`spec`'s settings (its `GREEKSD_<prefix>*` variables)."""
        value: S = self.per_broker[spec.name]
        return value

    def with_broker(self, spec: BrokerSpec[S], value: S) -> Settings:
        """These settings with `spec`'s default source's replaced by `value` (the demo
        points brokers at its simulators this way)."""
        return replace(self, per_broker={**self.per_broker, spec.name: value})

    def sources(self) -> tuple[SourceConfig, ...]:
        """The streams `greeksd run` starts: each of `brokers`' default source, then the
        named ones."""
        defaults = tuple(
            SourceConfig(name, spec, self.per_broker[name])
            for name, spec in ((name, registry.SPECS[name]) for name in self.brokers)
        )
        return defaults + self.named

    def source(self, name: str) -> SourceConfig:
        """A source by name: a named one, or any broker's default source (configured or
        not, so `greeksd probe ibkr` works whatever GREEKSD_BROKERS says). Raises
        ConfigError naming the ones there are."""
        try:
            parse_source(name)
        except ValueError as exc:
            raise ConfigError(f"source {name!r}: {exc}") from None
        if name == broker_of(name):
            return SourceConfig(name, registry.SPECS[name], self.per_broker[name])
        for source in self.named:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.named) or "none"
        raise ConfigError(f"source {name!r} is not configured (named sources: {known})")

    def select(self, names: tuple[str, ...]) -> Settings:
        """Only these sources (`greeksd run --brokers`): a broker's name is its default
        source, `<broker>:<name>` a named one from the settings file."""
        chosen = [self.source(n) for n in names]
        return replace(
            self,
            brokers=tuple(s.name for s in chosen if s.name == s.spec.name),
            named=tuple(s for s in chosen if s.name != s.spec.name),
        )

    def secrets(self) -> list[str]:
        """Values that must never reach a log line, a status payload or an error: every
        secret row's value (the brokers' and every source's too) and the database URL's
        passwords."""
        values = [v for v in table_secrets(self) if v != self.database_url]
        for broker_settings in self.per_broker.values():
            values.extend(table_secrets(broker_settings))
        for source in self.named:
            values.extend(table_secrets(source.settings))
        if self.database_url:
            values.extend(database_passwords(self.database_url))
        return values


SETTINGS: tuple[Setting, ...] = settings_table(Settings)
"""The service's own rows; `all_settings()` adds each registered broker's."""


def all_settings() -> tuple[Setting, ...]:
    """Every variable greeksd reads, in the README's order: the service's, then each
    registered broker's own (registry order)."""
    rows = list(SETTINGS)
    for spec in registry.specs():
        rows.extend(settings_table(spec.settings, spec.prefix))
    return tuple(rows)


def _prefixed(values: Mapping[str, str], prefix: str = "") -> dict[str, str]:
    """A settings file's values (by field name) as the variables they stand for."""
    return {PREFIX + (prefix + key).upper(): text for key, text in values.items()}


def load_settings(
    environ: Mapping[str, str] | None = None, *, dotenv_path: Path | None = None
) -> Settings:
    """Read settings: the process environment wins over `.env`, which wins over the
    settings file. Raises ConfigError."""
    env: dict[str, str] = {}
    dotenv_file = dotenv_path or Path.cwd() / ".env"
    if dotenv_file.is_file():
        env.update({k: v for k, v in dotenv_values(dotenv_file).items() if v is not None})
    env.update(os.environ if environ is None else environ)
    path = settings_file_path(env.get(PREFIX + "CONFIG_FILE", "").strip())
    file = (
        read_settings_file(path, Settings, not_in_file=frozenset({"config_file"}))
        if path is not None
        else SettingsFile()
    )
    values = read_values(Settings, {**_prefixed(file.top), **env})
    values["config_file"] = path
    brokers_given = PREFIX + "BROKERS" in env or "brokers" in file.top
    if file.sources and not brokers_given:
        values["brokers"] = tuple(s.spec.name for s in file.sources if s.name is None)
    defaults = {s.spec.name: s.values for s in file.sources if s.name is None}
    per_broker = {
        spec.name: read_table(
            spec.settings,
            {**_prefixed(defaults.get(spec.name, {}), spec.prefix), **env},
            spec.prefix,
        )
        for spec in registry.specs()
    }
    named = tuple(
        SourceConfig(
            source_name(s.spec.name, s.name),
            s.spec,
            read_table(s.spec.settings, _prefixed(s.values, s.spec.prefix), s.spec.prefix),
        )
        for s in file.sources
        if s.name is not None
    )
    return Settings(**values, per_broker=per_broker, named=named, warnings=file.warnings)
