"""What the gateway says about the brokerage session, through REST or the websocket,
and what it means. Pure: no sockets, no clocks.

What real gateways do that these rules exist for (see the protocol notes):
- `sts` arrives split into several frames, each with only some fields: an absent field is
  unknown, never false (`SessionState`).
- `competing: true` means another login took the brokerage session: report it, do not
  fight it (`COMPETING`).
- `/tickle` answers 401 while the gateway itself is not logged in; `/iserver/*` answers
  400 "no bridge" without a brokerage session (`rest_failure`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from greeksd.brokers.ibkr.protocol import AuthStatus

# ---- session -----------------------------------------------------------------------------
COMPETING = "competing session: another login holds the brokerage session"
NOT_AUTHENTICATED = "not authenticated"


def session_problem(authenticated: bool | None, competing: bool | None, message: str) -> str | None:
    """The degraded reason a status gives, or None when it gives none. Only an explicit
    `competing: true` or `authenticated: false` is a problem: unknown is not false."""
    if competing:
        return COMPETING
    if authenticated is False:
        return NOT_AUTHENTICATED + (f": {message}" if message else "")
    return None


def not_logged_in(gateway_url: str) -> str:
    """A 401 from /tickle: the user's browser login to the gateway itself is gone."""
    return f"gateway not logged in: open {gateway_url} and log in"


@dataclass(frozen=True, slots=True)
class Ready:
    """The merged status says authenticated and not competing: market data may flow."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The merged status explicitly says the session is unusable."""

    reason: str


@dataclass(slots=True)
class SessionState:
    """The websocket's auth status merged across partial `sts` frames (one socket's
    worth; a new socket starts unknown)."""

    authenticated: bool | None = None
    competing: bool | None = None
    message: str = ""

    def update(self, sts: AuthStatus) -> Ready | Lost | None:
        """Merge one frame; Ready or Lost only when this frame decides, None while the
        status is still unknown (a `{"message": ""}` frame alone decides nothing)."""
        if sts.authenticated is not None:
            self.authenticated = sts.authenticated
        if sts.competing is not None:
            self.competing = sts.competing
        if sts.message:  # an absent message is "" too: keep what an earlier frame said
            self.message = sts.message
        if sts.competing is None and sts.authenticated is None:
            return None
        problem = session_problem(self.authenticated, self.competing, self.message)
        if problem is not None:
            return Lost(problem)
        return Ready() if self.authenticated else None


# ---- REST answers ------------------------------------------------------------------------
class Failure(enum.Enum):
    NOT_LOGGED_IN = "not_logged_in"  # 401 on the gateway's own session calls
    NOT_AUTHENTICATED = "not_authenticated"  # 401 elsewhere
    NO_BRIDGE = "no_bridge"  # 400 "no bridge" on /iserver/*
    PENALTY_BOX = "penalty_box"  # 429
    ERROR = "error"  # any other HTTP error
    UNAVAILABLE = "unavailable"  # no answer at all (refused, TLS failure, timeout)


#: Failures that mean the session is gone: the link ends (a new one starts with /tickle).
SESSION_GONE = frozenset({Failure.NOT_LOGGED_IN, Failure.NOT_AUTHENTICATED, Failure.NO_BRIDGE})


_GATEWAY_SESSION_PATHS = frozenset({"/tickle", "/iserver/auth/status"})


def _error_text(body: Any) -> str:
    if isinstance(body, Mapping):
        return str(body.get("error") or "")
    return ""


def rest_failure(
    method: str, path: str, status: int, body: Any, text: str, gateway_url: str
) -> tuple[Failure, str] | None:
    """What an HTTP answer means; None when it is a success. `body` is the decoded JSON
    (or None), `text` the raw body for the message."""
    if status < 400:
        return None
    where = f"{method} {path}"
    if status == 429:
        return Failure.PENALTY_BOX, f"{where}: HTTP 429"
    if status == 401:
        if path in _GATEWAY_SESSION_PATHS:
            return Failure.NOT_LOGGED_IN, not_logged_in(gateway_url)
        return Failure.NOT_AUTHENTICATED, f"{NOT_AUTHENTICATED} (HTTP 401 on {where})"
    if status == 400 and path.startswith("/iserver/") and _error_text(body) == "no bridge":
        return (
            Failure.NO_BRIDGE,
            f'no bridge: the gateway has no brokerage session ({where} answered 400 "no '
            f'bridge"); log in again at {gateway_url}',
        )
    return Failure.ERROR, f"{where}: HTTP {status} {text[:200]}"


def tickle_session(body: Mapping[str, Any]) -> tuple[str, bool, bool, str]:
    """(session, authenticated, competing, message) of a /tickle body. A 200 body can be
    just `{"error": "no session"}` (no `iserver`): that is not authenticated, and the
    gateway's text is the message."""
    iserver = body.get("iserver")
    auth = iserver.get("authStatus") if isinstance(iserver, Mapping) else None
    auth = auth if isinstance(auth, Mapping) else {}
    message = str(auth.get("message") or body.get("error") or "")
    return (
        str(body.get("session") or ""),
        auth.get("authenticated") is True,
        auth.get("competing") is True,
        message,
    )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What `/tickle` and `/iserver/auth/status` report."""

    session: str
    authenticated: bool
    competing: bool
    message: str

    @property
    def problem(self) -> str | None:
        """The degraded reason, or None when market data can flow."""
        return session_problem(self.authenticated, self.competing, self.message)
