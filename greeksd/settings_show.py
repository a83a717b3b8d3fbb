"""`greeksd config`: the settings in effect and the sources `greeksd run` would start,
as text a user can read (and paste into an issue): secrets are masked, never shown."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from greeksd.config import Settings
from greeksd.settings_table import NOT_A_ROW, PREFIX, as_text, settings_table

MASK = "<redacted>"


def _rows(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(row name, shown value) for each of `value`'s settings, secrets masked."""
    shown = []
    for f, row in zip(
        [f for f in fields(value) if NOT_A_ROW not in f.metadata],
        settings_table(type(value), prefix),
        strict=True,
    ):
        text = as_text(getattr(value, f.name))
        shown.append((row.name, MASK if row.secret and text else text))
    return shown


def show_settings(settings: Settings) -> str:
    """Every service setting as `GREEKSD_NAME = value`, then each source with its
    broker's settings by the names a settings file uses."""
    lines = ["# precedence: environment > .env > settings file > defaults"]
    lines += [f"{PREFIX}{name} = {text}" for name, text in _rows(settings)]
    sources = settings.sources()
    lines.append("")
    lines.append(f"# sources ({len(sources)})" if sources else "# sources: none")
    for source in sources:
        lines.append("[[sources]]")
        lines.append(f'broker = "{source.spec.name}"')
        if source.name != source.spec.name:
            lines.append(f'name = "{source.name.partition(":")[2]}"')
        lines += [f"{name.lower()} = {text!r}" for name, text in _rows(source.settings)]
    return "\n".join(lines) + "\n"
