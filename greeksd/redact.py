"""Keeps secrets out of logs, status payloads and error messages."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_REPLACEMENT = "***"
_secrets: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s]+)@", re.I)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_COOKIE_SESSION = re.compile(r'(?i)("session"\s*:\s*")[^"]+(")')


def url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def register_secret(value: str | None) -> None:
    """Remember a value that must be masked wherever it appears later."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """Mask registered secrets, URL passwords, bearer tokens and session cookies."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _REPLACEMENT)
    text = _URL_PASSWORD.sub(rf"\g<scheme>:{_REPLACEMENT}@", text)
    text = _BEARER.sub(rf"\g<1>{_REPLACEMENT}", text)
    return _COOKIE_SESSION.sub(rf"\g<1>{_REPLACEMENT}\g<2>", text)
