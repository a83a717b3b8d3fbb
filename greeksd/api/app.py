"""Quart-Trio app: control and query endpoints over the running service.

Each route module is a blueprint with one job and carries its own OpenAPI entry
(`PATHS`); handlers only validate, call the supervisor/store and shape the answer.
Errors are always `{"error": <short code>, "detail": <human sentence>}` (greeksd.api.errors).
"""

from __future__ import annotations

from typing import Any

from quart_trio import QuartTrio

from greeksd.api import dashboard, greeks, metrics, risk, streaming, trades
from greeksd.api.errors import install_error_handlers
from greeksd.api.openapi import openapi_blueprint
from greeksd.api.params import MAX_BODY_BYTES
from greeksd.api.state import ServiceState

ROUTE_MODULES = (streaming, greeks, risk, trades, metrics, dashboard)


def create_app(state: ServiceState) -> QuartTrio:
    app = QuartTrio("greeksd")
    app.config["GREEKSD_STATE"] = state
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    install_error_handlers(app)
    paths: dict[str, Any] = {}
    for module in ROUTE_MODULES:
        app.register_blueprint(module.bp)
        paths.update(module.PATHS)
    app.register_blueprint(openapi_blueprint(paths))
    return app
