"""Quart-Trio app: control and query endpoints over the running service.

Each route module is a blueprint with one job and carries its own OpenAPI entry
(`PATHS`); handlers only validate, call the supervisor/store and shape the answer.
Errors are always `{"error": <short code>, "detail": <human sentence>}` (greeksd.api.errors).

Keep-alive. Every request's body is read (up to MAX_BODY_BYTES) before any answer, so a
401/404/405 sent while the body is still in flight leaves the connection at a clean
request boundary and the next request on it is served. A body over the limit is answered
413 with `Connection: close`. The app's sends are shielded from cancellation: Hypercorn
recycles or closes the connection from inside the last send, and quart-trio cancels the
request as soon as Hypercorn reports it over, which used to cut that bookkeeping short
and leave the connection neither recycled nor closed (the next request never answered).

Admission. The HTTP server shares the trio loop with the writer: every runnable request
task lengthens the loop's turn, and the writer waits a turn at each step, so 200 busy
connections took writer p99 from ~35 ms to ~0.5-1 s even on /healthz. At most
HTTP_GATE_SIZE requests are handled at once; the next waits at most HTTP_GATE_WAIT_S for
a turn and is otherwise answered 503 `busy` with Retry-After, straight from here (no
routing, no handler). /healthz and the stream start/stop controls are never gated
(UNGATED_PATHS).
"""

from __future__ import annotations

from typing import Any

import orjson
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from quart import Request, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from greeksd.api import coverage, dashboard, greeks, metrics, risk, streaming, trades
from greeksd.api.errors import RETRY_AFTER_BUSY_S, install_error_handlers
from greeksd.api.openapi import openapi_blueprint
from greeksd.api.params import MAX_BODY_BYTES
from greeksd.api.state import HTTP_GATE_SIZE, HTTP_GATE_WAIT_S, UNGATED_PATHS, ServiceState

ROUTE_MODULES = (streaming, coverage, greeks, risk, trades, metrics, dashboard)


class _ShieldedSends(TrioASGIHTTPConnection):
    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, send: ASGISendCallable
    ) -> None:
        async def send_to_the_end(message: ASGISendEvent) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await super().handle_request(nursery, request, send_to_the_end)


async def _answer_busy(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """503 busy without entering the app; the body is read first (keep-alive, above)."""
    size, close = 0, False
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))  # type: ignore[arg-type]
        if size > MAX_BODY_BYTES:
            close = True
            break
        if not message.get("more_body", False):
            break
    body = orjson.dumps(
        {
            "error": "busy",
            "detail": f"{HTTP_GATE_SIZE} requests are already being handled; "
            f"retry in {RETRY_AFTER_BUSY_S} s",
        }
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_BUSY_S).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class GreeksdApp(QuartTrio):
    asgi_http_class = _ShieldedSends

    async def __call__(  # type: ignore[override]
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope["path"] in UNGATED_PATHS:
            await super().__call__(scope, receive, send)
            return
        state: ServiceState = self.config["GREEKSD_STATE"]
        admitted = False
        with trio.move_on_after(HTTP_GATE_WAIT_S):
            await state.http_gate.acquire()
            admitted = True
        if not admitted:
            state.reads.refusals.note("busy", in_flight=HTTP_GATE_SIZE)
            await _answer_busy(receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        finally:
            state.http_gate.release()


async def _read_body_first() -> None:
    """Consume the body (cached for the handler) before routing or auth can answer."""
    await request.get_data(cache=True)


def create_app(state: ServiceState) -> QuartTrio:
    app = GreeksdApp("greeksd")
    app.config["GREEKSD_STATE"] = state
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.before_request(_read_body_first)
    install_error_handlers(app)
    paths: dict[str, Any] = {}
    for module in ROUTE_MODULES:
        app.register_blueprint(module.bp)
        paths.update(module.PATHS)
    app.register_blueprint(openapi_blueprint(paths, token_required=bool(state.settings.api_token)))
    return app
