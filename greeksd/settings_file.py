"""The settings file (TOML, `GREEKSD_CONFIG_FILE`, default `./greeksd.toml`): the
service's settings at the top level and any number of sources, checked here.

    instance = "desk-1"            # any service setting, by its variable's name after
    api_port = 8766                #   GREEKSD_, lower-case
    [[sources]]
    broker = "ibkr"                # a registered broker
    name = "alice"                 # optional: without it, the broker's default source
    url = "https://gw-alice:5000"  # that broker's settings, by the names after its prefix

A file outgrows environment variables once an instance runs several logins of one
broker: each `[[sources]]` entry is one stream. Every value is turned into the text an
environment variable would hold and checked by the same parser as that variable, so
the file and the environment cannot disagree on what a value means; an error names the
file, the entry and the key, and never shows a secret's value. The caller
(greeksd.config) merges the environment over the file.
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from greeksd.brokers import registry
from greeksd.brokers.spec import BrokerSpec
from greeksd.settings_table import NOT_A_ROW, ConfigError, Setting, settings_table
from greeksd.sources import NAME, NAME_RULE, source_name

DEFAULT_NAME = "greeksd.toml"


@dataclass(frozen=True)
class FileSource:
    """One `[[sources]]` entry: its broker, its own name (None: the broker's default
    source) and its settings as environment text, by field name."""

    spec: BrokerSpec[Any]
    name: str | None
    values: dict[str, str]

    @property
    def source(self) -> str:
        return source_name(self.spec.name, self.name)


@dataclass(frozen=True)
class SettingsFile:
    """What a settings file holds (empty when there is none)."""

    path: Path | None = None
    top: Mapping[str, str] = field(default_factory=dict)
    sources: tuple[FileSource, ...] = ()
    warnings: tuple[str, ...] = ()


def _text(value: Any) -> str | None:
    """A TOML value as the text an environment variable would hold (None: no such text)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    return None


def _checked(
    where: str, items: Mapping[str, Any], cls: type[Any], *, skip: frozenset[str] = frozenset()
) -> dict[str, str]:
    """`items` as environment text, every key a field of `cls` and every value accepted
    by its parser; ConfigError names `where` and the key."""
    rows: dict[str, Setting] = {
        f.name: row
        for f, row in zip(
            [f for f in fields(cls) if NOT_A_ROW not in f.metadata],
            settings_table(cls),
            strict=True,
        )
        if f.name not in skip
    }
    texts: dict[str, str] = {}
    for key, value in items.items():
        row = rows.get(key)
        if row is None:
            known = ", ".join(rows) or "(none)"
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {known}")
        text = _text(value)
        shown = "<redacted>" if row.secret else repr(value)
        if text is None:
            raise ConfigError(f"{where}: {key}={shown} must be a string, number or boolean")
        try:
            row.parse(text.strip())
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid {key}={shown}: {exc}") from None
        texts[key] = text
    return texts


def _source(path: Path, index: int, entry: Any) -> FileSource:
    where = f"{path}: [[sources]] #{index}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    entry = dict(entry)
    broker = entry.pop("broker", None)
    if not isinstance(broker, str):
        raise ConfigError(f"{where}: needs broker = one of {', '.join(registry.names())}")
    spec = registry.get(broker)
    if spec is None:
        raise ConfigError(f"{where}: unknown broker {broker!r}; use {', '.join(registry.names())}")
    name = entry.pop("name", None)
    if name is not None and (not isinstance(name, str) or NAME.fullmatch(name) is None):
        raise ConfigError(f"{where}: name={name!r} must be {NAME_RULE}")
    where = f"{where} ({source_name(broker, name)})"
    return FileSource(spec, name, _checked(where, entry, spec.settings))


def _readable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))


def read_settings_file(
    path: Path, service: type[Any], *, not_in_file: frozenset[str]
) -> SettingsFile:
    """Read and check `path`: its top-level keys are `service`'s fields (except
    `not_in_file`), its `[[sources]]` entries each a broker's. Source names must be
    unique. A file holding a secret that others can read is a warning."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    entries = data.pop("sources", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: sources must be an array of tables ([[sources]])")
    top = _checked(str(path), data, service, skip=not_in_file)
    sources = tuple(_source(path, i, entry) for i, entry in enumerate(entries, start=1))
    seen: dict[str, int] = {}
    for i, source in enumerate(sources, start=1):
        if source.source in seen:
            raise ConfigError(
                f"{path}: [[sources]] #{i}: duplicate source name {source.source!r} "
                f"(also #{seen[source.source]})"
            )
        seen[source.source] = i
    holds_secret = any(
        row.secret and row.name.lower() in top for row in settings_table(service)
    ) or any(
        row.secret and row.name.lower() in s.values
        for s in sources
        for row in settings_table(s.spec.settings)
    )
    warnings: tuple[str, ...] = ()
    if holds_secret and _readable_by_others(path):
        warnings = (
            f"settings file {path} holds secrets and is readable by other users; chmod 600 {path}",
        )
    return SettingsFile(path, top, sources, warnings)


def settings_file_path(configured: str | None) -> Path | None:
    """The file named by GREEKSD_CONFIG_FILE (which must exist), else `./greeksd.toml`
    if there is one, else None."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise ConfigError(f"GREEKSD_CONFIG_FILE={configured!r}: no such file")
        return path
    default = Path.cwd() / DEFAULT_NAME
    return default if default.is_file() else None
