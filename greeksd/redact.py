"""Keeps secrets out of logs, status payloads and error messages."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import urlsplit

from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict

_REPLACEMENT = "***"
_secrets: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s]+)@", re.I)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_COOKIE_SESSION = re.compile(r'(?i)("session"\s*:\s*")[^"]+(")')
_QUOTED = re.compile(r'"([^"]*)"')


def database_passwords(conninfo: str) -> list[str]:
    """The password of a libpq connection string (URL or key=value), as written and as
    libpq decodes it: either form may turn up in a message."""
    found: set[str] = set()
    with contextlib.suppress(ValueError):
        found.add(urlsplit(conninfo).password or "")
    with contextlib.suppress(PsycopgError):
        found.add(str(conninfo_to_dict(conninfo).get("password") or ""))
    return sorted(value for value in found if value)


def mask_quoted(message: str) -> str:
    """Replace every double-quoted fragment of a libpq error: libpq quotes the piece of
    the connection string it could not parse, and that piece may hold the password."""
    return _QUOTED.sub(lambda m: m[0] if len(m[1]) <= 1 else '"…"', message)


def register_secret(value: str | None) -> None:
    """Remember a value that must be masked wherever it appears later."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """Mask registered secrets, URL passwords, bearer tokens and session cookies."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _REPLACEMENT)
    # Each pattern only where its anchor occurs: the archive masks every inbound frame,
    # and three regex scans of a large frame cost more than one lower-casing.
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<scheme>:{_REPLACEMENT}@", text)
    lowered = text.lower()
    if "bearer" in lowered:
        text = _BEARER.sub(rf"\g<1>{_REPLACEMENT}", text)
    if '"session"' in lowered:
        text = _COOKIE_SESSION.sub(rf"\g<1>{_REPLACEMENT}\g<2>", text)
    return text
