"""One error shape for every route: `{"error": <code>, "detail": <sentence>}`.

Handlers raise `ApiError`; busy read connections, a database that cannot be reached and
a query over the statement timeout become a 503 with `Retry-After` (the client may
retry), anything unexpected a 500 that names the exception type but never carries a
stack trace. A 405 carries `Allow`.
"""

from __future__ import annotations

import psycopg
from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from greeksd.logs import get_logger
from greeksd.store.reads import ReadsBusy

log = get_logger("greeksd.api")

# Seconds a client should wait before retrying a 503.
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_DOWN_S = 5


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
        # Werkzeug's own headers carry e.g. `Allow` on a 405; ours carry the body type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        if code == 413:
            # The rest of the body is still coming and will not be read: end the
            # connection rather than parse it as the next request.
            headers["Connection"] = "close"
        return error_response(code, name, exc.description or "", headers)

    @app.errorhandler(ReadsBusy)
    async def reads_busy(exc: ReadsBusy) -> Response:
        return error_response(
            503,
            "reads_busy",
            f"{exc}; retry in {RETRY_AFTER_BUSY_S} s",
            {"Retry-After": str(RETRY_AFTER_BUSY_S)},
        )

    @app.errorhandler(psycopg.errors.QueryCanceled)
    async def query_timeout(exc: psycopg.errors.QueryCanceled) -> Response:
        log.warning("api_query_timeout", error=str(exc).strip())
        return error_response(
            503,
            "query_timeout",
            "the query ran over the read statement timeout; narrow the filters or the time "
            "range, or retry when the database is less busy",
            {"Retry-After": str(RETRY_AFTER_BUSY_S)},
        )

    @app.errorhandler(psycopg.OperationalError)
    async def database_down(exc: psycopg.OperationalError) -> Response:
        log.error("api_database_unavailable", error=f"{type(exc).__name__}: {str(exc).strip()}")
        return error_response(
            503,
            "database_unavailable",
            "the database cannot be reached; retry shortly",
            {"Retry-After": str(RETRY_AFTER_DOWN_S)},
        )

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        log.error("api_unhandled_error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        return error_response(500, "internal_error", f"unexpected {type(exc).__name__}")
