"""The OpenAPI document: shared pieces here, each route's entry next to the route (the
`PATHS` dict of its module); `create_app` merges them and a test checks that every
registered route is described.

The document follows the configuration: with GREEKSD_API_TOKEN set, the mutating routes
require the `bearer` scheme (and may answer 401); without one they are open, so neither
the scheme nor a 401 is described. Schemathesis tests the served document against the
running service (tests/test_api_schemathesis.py), so every constraint here is one the
handlers enforce."""

from __future__ import annotations

import copy
from typing import Any

from quart import Blueprint

from greeksd.api.params import DEFAULT_LIMIT, FORMATS, MAX_LIMIT
from greeksd.api.state import UNGATED_PATHS
from greeksd.brokers import registry
from greeksd.sources import INSTANCE, source_pattern

# PostgreSQL text cannot hold NUL; the handlers refuse it (400).
NO_NUL = "^[^\\u0000]*$"
# An empty query parameter is refused (400 empty_parameter), never read as "absent".
TEXT = {"type": "string", "minLength": 1, "pattern": NO_NUL}


def query_param(
    name: str, description: str, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or TEXT,
    }


TIME = {"type": "string", "format": "date-time", "minLength": 1}
FILTERS: list[dict[str, Any]] = [
    query_param("broker", "Only this broker.", {"type": "string", "enum": list(registry.names())}),
    query_param("account", "Only this account id."),
    query_param("contract_key", "Only this contract, e.g. 'AAPL 2025-06-20 C 190'."),
    query_param("underlying", "Only this underlying."),
    query_param("start", "Inclusive lower bound (ISO 8601; no offset means UTC).", TIME),
    query_param("end", "Exclusive upper bound (ISO 8601; no offset means UTC).", TIME),
]
SNAPSHOT_FILTERS: list[dict[str, Any]] = [
    *FILTERS,
    query_param(
        "source",
        "Only rows this source received: a broker's default source ('ibkr') or a named "
        "one ('ibkr:alice').",
        {"type": "string", "minLength": 1, "pattern": source_pattern()},
    ),
    query_param(
        "instance",
        "Only rows this instance (GREEKSD_INSTANCE) wrote.",
        {"type": "string", "minLength": 1, "pattern": f"^{INSTANCE.pattern}$"},
    ),
]
FORMAT = query_param("format", "Body format (streamed).", {"type": "string", "enum": list(FORMATS)})
LIMIT_AND_CURSOR: list[dict[str, Any]] = [
    query_param(
        "limit",
        f"Rows per page (default {DEFAULT_LIMIT}).",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    ),
    query_param("cursor", "Opaque `next` value from the previous page."),
]
ERROR = {
    "description": "Error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            }
        }
    },
}
# Too many requests at once, busy read connections, a database that is down, a query over
# the statement timeout.
UNAVAILABLE = {
    **ERROR,
    "description": "Try again later (busy, reads_busy, database_unavailable, query_timeout)",
    "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
}
ROWS_RESPONSES: dict[str, Any] = {
    "200": {
        "description": "Rows as JSON {next, rows}, NDJSON or CSV; X-Next-Cursor header when "
        "another page exists.",
        "content": {t: {} for t in ("application/json", "application/x-ndjson", "text/csv")},
    },
    "400": ERROR,
    "503": UNAVAILABLE,
}
JSON_OK: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {}}}}
GUARDED_ERRORS: dict[str, Any] = {"400": ERROR, "401": ERROR, "415": ERROR}


def _gated(paths: dict[str, Any]) -> dict[str, Any]:
    """Every gated route may answer 503 busy (greeksd.api.app)."""
    gated = copy.deepcopy(paths)
    for path, operations in gated.items():
        if path not in UNGATED_PATHS:
            for operation in operations.values():
                operation.setdefault("responses", {}).setdefault("503", UNAVAILABLE)
    return gated


def _open_access(paths: dict[str, Any]) -> dict[str, Any]:
    """`paths` as served when no token is configured: no security, no 401."""
    opened = copy.deepcopy(paths)
    for operations in opened.values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
    return opened


def build_spec(paths: dict[str, Any], *, token_required: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "greeksd",
            "version": "1",
            "description": "Mutating routes need 'Authorization: Bearer <GREEKSD_API_TOKEN>'."
            if token_required
            else "No GREEKSD_API_TOKEN is configured: every route is open (loopback only).",
        },
        "paths": dict(sorted(_gated(paths if token_required else _open_access(paths)).items())),
    }
    if token_required:
        spec["components"] = {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        }
    return spec


def openapi_blueprint(paths: dict[str, Any], *, token_required: bool) -> Blueprint:
    bp = Blueprint("openapi", __name__)
    spec = build_spec(
        {
            **paths,
            "/openapi.json": {"get": {"summary": "This document.", "responses": JSON_OK}},
        },
        token_required=token_required,
    )

    @bp.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return spec

    return bp
