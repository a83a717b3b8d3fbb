"""Bearer-token guard for the routes that change something (start, stop, trades).

With no GREEKSD_API_TOKEN set the API is loopback-only (service.check_api_exposure) and
open; with one set, every mutating request must carry it. The comparison is constant
time and the token never appears in a response or a log line.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from quart import request

from greeksd.api.errors import ApiError
from greeksd.api.state import current_state

P = ParamSpec("P")
R = TypeVar("R")

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="greeksd"'}


def check_token(expected: str | None, header: str | None) -> None:
    if not expected:
        return
    if not header:
        raise ApiError(
            401,
            "missing_token",
            "this route needs 'Authorization: Bearer <GREEKSD_API_TOKEN>'",
            _CHALLENGE,
        )
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise ApiError(401, "bad_token", "the bearer token is not the configured one", _CHALLENGE)


def requires_token(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        check_token(current_state().settings.api_token, request.headers.get("Authorization"))
        return await handler(*args, **kwargs)

    return guarded
