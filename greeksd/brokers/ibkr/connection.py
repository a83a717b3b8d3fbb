"""Sans-I/O decisions of the IBKR client: what a status frame, a REST answer or a clock
reading means for the link. No sockets, no clocks except the `now` passed in.

The I/O shell (`stream.py`, `gateway.py`, `probe.py`) asks these and acts; the same rules
therefore hold for the live stream, the probe and any replay. This is the first part of
the `Connection` the design describes (greeksd/brokers/<broker>/connection.py).

What real gateways do that these rules exist for (see the protocol notes):
- `sts` arrives split into several frames, each with only some fields: an absent field is
  unknown, never false (`SessionState`).
- `competing: true` means another login took the brokerage session: report it, do not
  fight it (`COMPETING`).
- `/tickle` answers 401 while the gateway itself is not logged in; `/iserver/*` answers
  400 "no bridge" without a brokerage session (`rest_failure`).
- Field 6509 starting with `D` is delayed data, `Z`/`Y` frozen (`protocol.market_data_quality`,
  a field format, so the market-data book applies it to every row).
- IBKR paces REST per endpoint and answers a burst with 429 and a penalty box
  (`RestPacer`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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


# ---- REST pacing -------------------------------------------------------------------------
#: IBKR's documented Client Portal pacing: 10 requests/s through the gateway overall, and
#: lower limits on some endpoints (the ones greeksd calls or may call), as the minimum
#: spacing in seconds between two calls. Paths are exact (`/portfolio/accounts` is not
#: `/portfolio/{acct}/positions/0`).
GLOBAL_INTERVAL_S = 0.1
ENDPOINT_INTERVALS_S: Mapping[str, float] = {
    "/tickle": 1.0,
    "/portfolio/accounts": 5.0,
    "/portfolio/subaccounts": 5.0,
    "/iserver/account/trades": 5.0,
    "/iserver/account/orders": 5.0,
    "/sso/validate": 60.0,
}
#: A 429 without Retry-After: IBKR's penalty box lasts about 10 minutes.
PENALTY_S = 600.0


@dataclass
class RestPacer:
    """Slots for REST calls: a call may start once the global spacing and its endpoint's
    spacing have passed since the previous ones, and never inside a penalty box.

    `scale` multiplies every spacing (1.0 = IBKR's limits; 0 turns pacing off, for a
    simulator that does not enforce it); the penalty box is never scaled."""

    scale: float = 1.0
    intervals: Mapping[str, float] = field(default_factory=lambda: dict(ENDPOINT_INTERVALS_S))
    global_interval: float = GLOBAL_INTERVAL_S
    default_penalty_s: float = PENALTY_S
    penalty_until: float | None = None
    penalty_until_wall: datetime | None = None
    _next_any: float = 0.0
    _next: dict[str, float] = field(default_factory=dict)

    def penalty_remaining(self, now: float) -> float:
        if self.penalty_until is None or now >= self.penalty_until:
            return 0.0
        return self.penalty_until - now

    def acquire(self, path: str, now: float) -> float:
        """0.0 when a call to `path` may start now (it is counted from now), else how
        long to wait before asking again. Nothing is reserved ahead, so a call waiting
        for its endpoint's slot (a tickle within 1 s of the last) never holds up others."""
        ready = max(self._next_any, self._next.get(path, 0.0))
        if now < ready:
            return ready - now
        self._next_any = now + self.global_interval * self.scale
        if path in self.intervals:
            self._next[path] = now + self.intervals[path] * self.scale
        return 0.0

    def penalize(self, now: float, wall_now: datetime, retry_after: float | None) -> float:
        """A 429: no call for Retry-After seconds when the gateway said, else the
        documented ~10 minutes. Returns the penalty in seconds."""
        seconds = self.default_penalty_s if retry_after is None else retry_after
        self.penalty_until = now + seconds
        self.penalty_until_wall = wall_now + timedelta(seconds=seconds)
        return seconds

    def penalty_reason(self) -> str:
        until = self.penalty_until_wall
        return "gateway penalty box until " + (until.strftime("%H:%M:%S UTC") if until else "?")
