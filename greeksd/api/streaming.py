"""Stream control: status, and start/stop of one broker's stream or all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Blueprint

from greeksd.api.auth import requires_token
from greeksd.api.errors import bad_request
from greeksd.api.openapi import ERROR, GUARDED_ERRORS, JSON_OK
from greeksd.api.params import json_body, parse_broker, reject_unknown_fields
from greeksd.api.state import current_state
from greeksd.model import StreamState

bp = Blueprint("streaming", __name__)


@bp.get("/healthz")
async def healthz() -> dict[str, Any] | tuple[dict[str, Any], int]:
    """503 while the writer is degraded (database down, hung, or not migrated yet): rows
    are then only spooled, and a load balancer or supervisor should know."""
    stats = current_state().writer.stats
    if stats.state is StreamState.DEGRADED:
        detail = stats.last_error or "the writer cannot reach the database"
        return {
            "error": "writer_degraded",
            "detail": detail,
            "status": "degraded",
            "writer": stats.state.value,
        }, 503
    return {"status": "ok", "writer": stats.state.value}


@bp.get("/v1/streaming/status")
async def status() -> dict[str, Any]:
    state = current_state()
    return await state.on_service_loop(state.status_json)


async def _apply(action: Callable[[str], bool], done: str) -> dict[str, Any]:
    """Run `action` on the stream named in the body, or on every stream."""
    state = current_state()
    body = await json_body(required=False) or {}
    reject_unknown_fields(body, ("broker",))
    # Only an absent broker (or an empty body) means every stream: a null is refused, so a
    # client whose variable is unset cannot stop everything by accident.
    broker = body.get("broker")
    if "broker" in body and not isinstance(broker, str):
        raise bad_request(
            "bad_broker", "broker must be a string naming one stream; omit it for every stream"
        )
    names = (
        state.supervisor.names if broker is None else [parse_broker(broker, state.supervisor.names)]
    )

    def act() -> tuple[list[str], dict[str, Any]]:
        changed = [name for name in names if action(name)]
        return changed, state.status_json()

    # On the service's loop: start/stop open and cancel scopes in the supervisor's nursery.
    changed, status_now = await state.on_service_loop(act)
    return {done: changed, "unchanged": [n for n in names if n not in changed], **status_now}


@bp.post("/v1/streaming/start")
@requires_token
async def start() -> dict[str, Any]:
    return await _apply(current_state().supervisor.start, "started")


@bp.post("/v1/streaming/stop")
@requires_token
async def stop() -> dict[str, Any]:
    return await _apply(current_state().supervisor.stop, "stopped")


_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "broker": {
                        "type": "string",
                        "minLength": 1,
                        "description": "One stream's name; omit it (or send no body) for "
                        "every stream. null is refused.",
                    }
                },
                "additionalProperties": False,
            }
        }
    },
}
PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "Liveness and the writer's state; 503 while the writer is degraded.",
            "responses": {**JSON_OK, "503": ERROR},
        }
    },
    "/v1/streaming/status": {
        "get": {"summary": "Per-stream state and writer statistics.", "responses": JSON_OK}
    },
    **{
        f"/v1/streaming/{verb}": {
            "post": {
                "summary": f"{verb.capitalize()} one broker's stream (body broker) or all.",
                "security": [{"bearer": []}],
                "requestBody": _BODY,
                "responses": {**JSON_OK, **GUARDED_ERRORS, "503": ERROR},
            }
        }
        for verb in ("start", "stop")
    },
}
