"""Quart-Trio app: control and query endpoints over the running service.

Handlers only validate, call the supervisor/store and shape JSON; errors are always
`{"error": <short code>, "detail": <human sentence>}` with a fitting status.
"""

from __future__ import annotations

from typing import Any

from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from greeksd.api.state import ServiceState
from greeksd.logs import get_logger

log = get_logger("greeksd.api")


def error_response(status: int, error: str, detail: str) -> tuple[Response, int]:
    return jsonify({"error": error, "detail": detail}), status


def create_app(state: ServiceState) -> QuartTrio:
    app = QuartTrio("greeksd")
    app.config["GREEKSD_STATE"] = state

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        return error_response(
            code, (exc.name or "error").lower().replace(" ", "_"), exc.description or ""
        )

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> tuple[Response, int]:
        log.error("api_unhandled_error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "writer": state.writer.stats.state.value}

    @app.get("/v1/streaming/status")
    async def streaming_status() -> dict[str, Any]:
        return state.status_json()

    return app
