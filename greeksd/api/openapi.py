"""The OpenAPI document: shared pieces here, each route's entry next to the route (the
`PATHS` dict of its module); `create_app` merges them and a test checks that every
registered route is described."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from greeksd.api.params import BROKERS, DEFAULT_LIMIT, FORMATS, MAX_LIMIT


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


TIME = {"type": "string", "format": "date-time"}
FILTERS: list[dict[str, Any]] = [
    _query("broker", "Only this broker.", {"type": "string", "enum": list(BROKERS)}),
    _query("account", "Only this account id."),
    _query("contract_key", "Only this contract, e.g. 'AAPL 2025-06-20 C 190'."),
    _query("underlying", "Only this underlying."),
    _query("start", "Inclusive lower bound (ISO 8601; no offset means UTC).", TIME),
    _query("end", "Exclusive upper bound (ISO 8601; no offset means UTC).", TIME),
]
FORMAT = _query("format", "Body format (streamed).", {"type": "string", "enum": list(FORMATS)})
LIMIT_AND_CURSOR: list[dict[str, Any]] = [
    _query(
        "limit",
        f"Rows per page (default {DEFAULT_LIMIT}).",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    ),
    _query("cursor", "Opaque `next` value from the previous page."),
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
ROWS_RESPONSES: dict[str, Any] = {
    "200": {
        "description": "Rows as JSON {next, rows}, NDJSON or CSV; X-Next-Cursor header when "
        "another page exists.",
        "content": {t: {} for t in ("application/json", "application/x-ndjson", "text/csv")},
    },
    "400": ERROR,
    "503": ERROR,
}
JSON_OK: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {}}}}
GUARDED_ERRORS: dict[str, Any] = {"400": ERROR, "401": ERROR, "415": ERROR}


def build_spec(paths: dict[str, Any]) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "greeksd", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": dict(sorted(paths.items())),
    }


def openapi_blueprint(paths: dict[str, Any]) -> Blueprint:
    bp = Blueprint("openapi", __name__)
    spec = build_spec(
        {
            **paths,
            "/openapi.json": {"get": {"summary": "This document.", "responses": JSON_OK}},
        }
    )

    @bp.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        return spec

    return bp
