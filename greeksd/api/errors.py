"""One error shape for every route: `{"error": <code>, "detail": <sentence>}`.

Handlers raise `ApiError`; a database that cannot be reached becomes a 503 (the client
may retry), anything unexpected a 500 that names the exception type but never carries a
stack trace.
"""

from __future__ import annotations

import psycopg
from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from greeksd.logs import get_logger

log = get_logger("greeksd.api")


class ApiError(Exception):
    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def bad_request(error: str, detail: str) -> ApiError:
    return ApiError(400, error, detail)


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def install_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        return error_response(code, name, exc.description or "")

    @app.errorhandler(psycopg.OperationalError)
    async def database_down(exc: psycopg.OperationalError) -> Response:
        log.error("api_database_unavailable", error=f"{type(exc).__name__}: {str(exc).strip()}")
        return error_response(
            503, "database_unavailable", "the database cannot be reached; retry shortly"
        )

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        log.error("api_unhandled_error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        return error_response(500, "internal_error", f"unexpected {type(exc).__name__}")
