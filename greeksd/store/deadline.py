"""Bounded database calls: a database that hangs is treated like one that refuses.

A stopped server refuses at once; a hung one (processes frozen, a lock held, a network
path that silently drops packets) just never answers, and a blocking psycopg call would
wait forever. Three layers, because each catches what the others cannot:

- transport (`with_timeouts`): `connect_timeout`, TCP keepalives and `tcp_user_timeout`
  in the connection parameters, so a dead TCP path errors out by itself (libpq ignores
  them on a Unix socket);
- server (`Watch.open`): `statement_timeout` on the session, so a lock wait or a runaway
  statement is cancelled by the server and the backend does not linger;
- client (`call_bounded`): a wall-clock deadline per call. Nothing else notices a server
  whose processes are frozen. The call runs in a worker thread; on expiry the socket of
  the connection that thread is using is shut down (`shutdown(2)` on a duplicate of its
  descriptor), so libpq, waiting in poll/recv, sees EOF and raises *in its own thread*:
  the connection is never closed under its feet, and the thread does not linger.

The deadline is wall-clock time (a `threading.Timer`), not trio's clock: it bounds a real
socket, and trio's clock may be virtual in tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

T = TypeVar("T")

# How much longer than the server's statement_timeout the client waits: a lock wait is
# then ended cleanly by the server (QueryCanceled, connection reusable) and only a server
# that does not answer at all is cut off by the client.
CLIENT_GRACE_S = 1.0


# The server is unreachable or the connection broke: worth retrying the same rows.
# Anything else (a value the table refuses) would fail forever: the batch is set aside.
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError)


class DatabaseTimeout(psycopg.OperationalError):
    """The database did not answer within the deadline: a hang, handled like an outage."""


def with_timeouts(url: str, timeout_s: float) -> str:
    """`url` with connect/keepalive/TCP-user timeouts derived from `timeout_s`; values the
    URL already sets are kept (the user knows their network)."""
    whole_s = max(2, math.ceil(timeout_s))  # libpq's smallest connect_timeout is 2 s
    wanted: dict[str, int] = {
        "connect_timeout": whole_s,
        "keepalives": 1,
        "keepalives_idle": whole_s,
        "keepalives_interval": max(1, whole_s // 3),
        "keepalives_count": 3,
        "tcp_user_timeout": int(timeout_s * 1000),
    }
    present = conninfo_to_dict(url)
    missing = {key: value for key, value in wanted.items() if key not in present}
    return make_conninfo(url, **missing) if missing else url


class Link:
    """A connection plus a duplicate of its socket's descriptor. `sever()` (any thread)
    shuts the socket down, which makes a thread blocked in libpq on it fail promptly;
    holding the duplicate keeps the descriptor number from being reused by another file
    while we might still shut it down. `close()` belongs to the thread using the link."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._lock = threading.Lock()
        self._closed = False

    def sever(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


class Watch:
    """One bounded call's knowledge of the connection its worker thread is using, shared
    between that thread (`open`/`use`) and the deadline (`expire`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._link: Link | None = None
        self._settled = False
        self.expired = False

    def use(self, link: Link) -> Link:
        """Register `link` as the one this call uses (severed at once if already late)."""
        with self._lock:
            self._link = link
            late = self.expired
        if late:
            link.sever()
        return link

    def open(
        self,
        connect: Callable[[str], psycopg.Connection],
        url: str,
        statement_timeout_s: float | None,
    ) -> Link:
        """Connect (in the worker thread) and set the session's statement_timeout."""
        conn = connect(url)
        try:
            link = self.use(Link(conn))
        except BaseException:
            conn.close()
            raise
        try:
            if statement_timeout_s is not None:
                ms = max(1, int(statement_timeout_s * 1000))
                link.conn.execute(f"SET statement_timeout = {ms}")
                link.conn.commit()
        except BaseException:
            link.close()
            raise
        return link

    def expire(self) -> bool:
        """The deadline passed: sever the connection in use. False if the call had
        already settled (then nothing is touched)."""
        with self._lock:
            if self._settled:
                return False
            self.expired = True
            link = self._link
        if link is not None:
            link.sever()
        return True

    def settle(self) -> None:
        with self._lock:
            self._settled = True


async def call_bounded(
    fn: Callable[[Watch], T], timeout_s: float, limiter: trio.CapacityLimiter
) -> T:
    """Run `fn(watch)` in a worker thread for at most `timeout_s` wall-clock seconds.

    `fn` registers the connection it uses on `watch` (`watch.open` / `watch.use`) and
    closes it itself when it fails. On expiry that connection is severed, the thread
    errors out on its own, and this raises DatabaseTimeout without waiting for it. If the
    caller is cancelled, the connection is severed the same way: no thread outlives its
    call for longer than it takes to notice a dead socket (or, while still connecting,
    `connect_timeout`). The limiter stays held until the thread has really finished, so
    a `CapacityLimiter(1)` guarantees that no two threads ever share a connection."""
    watch = Watch()
    token = trio.lowlevel.current_trio_token()
    completed = False
    with trio.CancelScope() as scope:

        def on_deadline() -> None:
            if watch.expire():
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(scope.cancel)

        timer = threading.Timer(timeout_s, on_deadline)
        timer.daemon = True
        timer.start()
        try:
            result = await trio.to_thread.run_sync(
                fn, watch, abandon_on_cancel=True, limiter=limiter
            )
            completed = True
        except psycopg.Error as exc:
            # libpq's own connect_timeout may beat the deadline's timer to it (a loaded
            # box runs the timer late): not answering a connect is the same failure
            if watch.expired:
                raise DatabaseTimeout(_not_answering(timeout_s)) from exc
            if isinstance(exc, psycopg.errors.ConnectionTimeout):
                raise DatabaseTimeout(f"database not answering a connect: {exc}") from exc
            raise
        finally:
            timer.cancel()
            if not completed:
                watch.expire()
            watch.settle()
    if not completed:
        raise DatabaseTimeout(_not_answering(timeout_s))
    return result


def _not_answering(timeout_s: float) -> str:
    return f"database not answering within {timeout_s:g} s"
