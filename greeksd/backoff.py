"""Bounded, jittered exponential backoff shared by every reconnect and retry loop, and
`Reconnect`: backoff only when the server refused, fast probing while it is gone."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from greeksd.logs import get_logger
from greeksd.model import StreamStatus

log = get_logger("greeksd.reconnect")


@dataclass
class Backoff:
    """`next_delay()` grows initial * factor**n up to `maximum`, with full jitter in
    [delay/2, delay] so many clients restarting together do not stampede; `reset()`
    after a success."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return self.rng.uniform(ceiling / 2.0, ceiling)

    def reset(self) -> None:
        self.attempts = 0


Address = tuple[str, int]

_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}


def url_address(url: str) -> Address:
    """(host, port) a client of `url` connects to: what a reachability probe dials."""
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)


async def tcp_reachable(address: Address, within_s: float) -> bool:
    """One TCP connect, closed at once: no TLS, no request, no session, no rate-limit
    slot. A refused, unroutable or silent address is unreachable."""
    with trio.move_on_after(within_s):
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


@dataclass
class Reconnect:
    """The wait between two connection attempts of a stream.

    A long backoff is right when the server answered and refused (not authenticated,
    competing session, a closed socket, HTTP errors): retrying fast would hammer it. It
    is wrong while the server is simply gone: after a 30 s outage the delay had grown to
    ~30 s, so the stream came back up to 30 s after the server did. So `pause` first asks
    whether the server the failed attempt talked to accepts a TCP connection at all; if
    not, it probes every `probe_interval` s (jittered down to 75%) until it does and
    returns at once, without advancing the backoff: reconnected within about one
    interval of the server's return, whatever the outage's length, at one TCP connect
    per interval meanwhile.
    """

    backoff: Backoff
    probe_interval: float = 2.0
    probe_timeout: float = 2.0
    rng: random.Random = field(default_factory=random.Random)

    async def pause(self, status: StreamStatus, address: Address | None) -> None:
        """`address`: the server the failed attempt talked to; None when it is known to
        have answered (a refused credential), so only the backoff applies."""
        if address is not None and not await self._probe(status, address):
            await self._until_reachable(status, address)
            return
        delay = self.backoff.next_delay()
        log.info("reconnect_backoff", delay_s=round(delay, 3))
        await trio.sleep(delay)

    async def _probe(self, status: StreamStatus, address: Address) -> bool:
        status.reachability_probes += 1
        return await tcp_reachable(address, self.probe_timeout)

    async def _until_reachable(self, status: StreamStatus, address: Address) -> None:
        host, port = address
        since, probes = trio.current_time(), 1
        log.warning("server_unreachable", host=host, port=port, probe_every_s=self.probe_interval)
        while True:
            await trio.sleep(self.rng.uniform(0.75, 1.0) * self.probe_interval)
            probes += 1
            if await self._probe(status, address):
                break
        waited = round(trio.current_time() - since, 1)
        log.info("server_reachable", host=host, port=port, after_s=waited, probes=probes)
