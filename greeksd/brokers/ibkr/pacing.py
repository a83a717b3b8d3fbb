"""IBKR's REST pacing as data: which call may start when, and the penalty box after a
429. Pure (the `now` is passed in); `GatewayClient` asks it before every request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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
