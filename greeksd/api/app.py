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
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.typing import ASGISendCallable, ASGISendEvent
from quart import Request, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from greeksd.api import dashboard, greeks, metrics, risk, streaming, trades
from greeksd.api.errors import install_error_handlers
from greeksd.api.openapi import openapi_blueprint
from greeksd.api.params import MAX_BODY_BYTES
from greeksd.api.state import ServiceState

ROUTE_MODULES = (streaming, greeks, risk, trades, metrics, dashboard)


class _ShieldedSends(TrioASGIHTTPConnection):
    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, send: ASGISendCallable
    ) -> None:
        async def send_to_the_end(message: ASGISendEvent) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await super().handle_request(nursery, request, send_to_the_end)


class GreeksdApp(QuartTrio):
    asgi_http_class = _ShieldedSends


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
