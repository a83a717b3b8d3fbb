"""The settings table: one row per environment variable, carried by dataclass fields.

A settings dataclass (the service's `greeksd.config.Settings`, each broker's own) declares
every field with `setting(...)`: its default as the text an environment would hold, how
that text is parsed and checked, the README's help line, and whether it is a secret.
`settings_table` reads the rows off the fields and `read_table` builds the dataclass
from an environment, so a variable cannot be parsed in one place and missing from
another. It imports nothing from greeksd, so a broker package declares its table here
without importing the service's configuration (which lists the brokers' tables).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "GREEKSD_"

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value greeksd cannot use; the message names the variable."""


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


def setting(
    default: str | Callable[[], str],
    parse: Callable[[str], Any],
    help: str,
    *,
    secret: bool = False,
) -> Any:
    """A settings field with its table row in the field's metadata (the name comes
    from the field). Typed `Any` so mypy checks the field's annotation, not this."""
    return field(metadata={"setting": Setting("", default, parse, help, secret)})


NOT_A_ROW = "not_a_row"
"""Metadata key of a field that holds no variable of its own (the brokers' tables in
`Settings`); its value says where those variables are declared."""


def settings_table(cls: type[Any], prefix: str = "") -> tuple[Setting, ...]:
    """The table rows carried by `cls`'s fields, named `prefix` + the field's name. A
    field without a row (and not marked `NOT_A_ROW`) is an error at import, so no
    setting can be half-declared."""
    rows = []
    for f in fields(cls):
        if NOT_A_ROW in f.metadata:
            continue
        row = f.metadata.get("setting")
        if not isinstance(row, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} has no settings-table row (setting)")
        rows.append(replace(row, name=(prefix + f.name).upper()))
    return tuple(rows)


def read_values(cls: type[Any], env: Mapping[str, str], prefix: str = "") -> dict[str, Any]:
    """`cls`'s fields parsed from `env` (defaults where unset), by field name. Raises
    ConfigError naming the variable, never showing a secret's value."""
    values: dict[str, Any] = {}
    for f, row in zip(
        [f for f in fields(cls) if NOT_A_ROW not in f.metadata],
        settings_table(cls, prefix),
        strict=True,
    ):
        variable = PREFIX + row.name
        raw = env.get(variable)
        if raw is None:
            raw = row.default() if callable(row.default) else row.default
        try:
            values[f.name] = row.parse(raw.strip())
        except ValueError as exc:
            shown = "<redacted>" if row.secret else repr(raw)
            raise ConfigError(f"invalid {variable}={shown}: {exc}") from None
    return values


def read_table(cls: type[T], env: Mapping[str, str], prefix: str = "") -> T:
    """An instance of `cls` from `env` (see `read_values`)."""
    return cls(**read_values(cls, env, prefix))


def table_secrets(value: Any) -> list[str]:
    """The values of `value`'s secret fields that are set."""
    return [
        secret
        for f in fields(value)
        if NOT_A_ROW not in f.metadata
        and f.metadata["setting"].secret
        and isinstance(secret := getattr(value, f.name), str)
        and secret
    ]


def table_env(value: Any, prefix: str = "") -> dict[str, str]:
    """The environment that `read_table(type(value), env, prefix)` reads back as `value`
    (to hand a broker's settings to another process, e.g. the benchmark's worker)."""
    rows = settings_table(type(value), prefix)
    return {
        PREFIX + row.name: as_text(getattr(value, f.name))
        for f, row in zip(fields(value), rows, strict=True)
    }


def as_text(value: Any) -> str:
    """A setting's value as the text an environment variable would hold."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# ---- parsers shared by the tables ----------------------------------------------------
def int_between(minimum: int, maximum: int, wanted: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be {wanted}") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"must be {wanted}")
        return value

    return parse


positive_int = int_between(1, 2**31 - 1, "a positive integer")
non_negative_int = int_between(0, 2**31 - 1, "zero or a positive integer")
port = int_between(0, 65535, "a TCP port 0-65535")


def float_where(accept: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """A float parser accepting what `accept` says (NaN never passes a comparison)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be {wanted}") from None
        if not accept(value):
            raise ValueError(f"must be {wanted}")
        return value

    return parse


positive_float = float_where(lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = float_where(lambda v: 0 <= v < math.inf, "zero or a positive number")


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def optional_str(text: str) -> str | None:
    return text or None


def optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None
