"""The trades log: read it (paged like snapshots) and append strategy-log entries.

POST is idempotent on (broker, broker_trade_id): 201 with the stored row when new, 200
with the stored row when the same entry was already there, 409 when the id is taken by
a different entry. Without a broker_trade_id the id is derived from the entry's content,
so a client retrying the same POST still stores it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from quart import Blueprint, Response

from greeksd.api.auth import requires_token
from greeksd.api.errors import ApiError, bad_request
from greeksd.api.greeks import paged
from greeksd.api.openapi import (
    ERROR,
    FILTERS,
    FORMAT,
    GUARDED_ERRORS,
    LIMIT_AND_CURSOR,
    NO_NUL,
    ROWS_RESPONSES,
)
from greeksd.api.output import json_response
from greeksd.api.params import (
    FILTER_PARAMS,
    Args,
    check_text,
    json_body,
    parse_broker,
    parse_contract_key,
    parse_time,
    reject_unknown_fields,
)
from greeksd.api.state import current_state
from greeksd.brokers import registry
from greeksd.model import Trade
from greeksd.store.queries import TRADES
from greeksd.store.trades import record_trade

bp = Blueprint("trades", __name__)

FIELDS: tuple[str, ...] = (
    "broker",
    "account_id",
    "symbol",
    "side",
    "quantity",
    "price",
    "executed_at",
    "contract_key",
    "broker_trade_id",
    "note",
)
# The fields that make two entries the same entry (the rest is bookkeeping).
SAME_ENTRY: tuple[str, ...] = (
    "account_id",
    "contract_key",
    "symbol",
    "side",
    "quantity",
    "price",
    "executed_at",
    "source",
    "note",
)
MAX_TEXT = 200
# quantity and price: what the API renders back exactly (an integer below 2**53 is an exact
# JSON number) and PostgreSQL's numeric stores; anything larger or finer is a typo.
MAX_ABS_NUMBER = Decimal(10) ** 15
MAX_DECIMAL_PLACES = 20


def trade_brokers() -> tuple[str, ...]:
    """The brokers whose trades the log holds (their spec's `trades`)."""
    return tuple(spec.name for spec in registry.specs() if spec.trades)


@bp.get("/v1/trades")
async def list_trades() -> Response:
    return await paged(
        TRADES, Args(*FILTER_PARAMS[:3], "start", "end", "limit", "cursor", "format")
    )


def _text(body: dict[str, Any], name: str, *, required: bool, limit: int = MAX_TEXT) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request("missing_field", f"{name} is required")
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise bad_request(f"bad_{name}", f"{name} must be a non-empty string of at most {limit}")
    return check_text(name, value)


def _decimal(body: dict[str, Any], name: str) -> Decimal | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad_request(f"bad_{name}", f"{name} must be a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise bad_request(f"bad_{name}", f"{name}={value!r} is not a number") from None
    exponent = number.as_tuple().exponent
    if (
        not number.is_finite()
        or abs(number) >= MAX_ABS_NUMBER
        or (isinstance(exponent, int) and exponent < -MAX_DECIMAL_PLACES)
    ):
        raise bad_request(
            f"bad_{name}",
            f"{name}={value!r} is out of range: it must be finite, below 1e15 in magnitude, "
            f"with at most {MAX_DECIMAL_PLACES} decimal places",
        )
    return number


def _derived_id(values: dict[str, Any]) -> str:
    canonical = orjson.dumps(
        {k: str(v) if isinstance(v, Decimal) else v for k, v in sorted(values.items())},
        default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v),
    )
    return "strategy-" + hashlib.sha256(canonical).hexdigest()[:32]


def parse_trade(body: dict[str, Any]) -> Trade:
    reject_unknown_fields(body, FIELDS)
    broker = parse_broker(_text(body, "broker", required=True) or "", trade_brokers())
    side = _text(body, "side", required=True)
    if side not in ("buy", "sell"):
        raise bad_request("bad_side", "side must be 'buy' or 'sell'")
    quantity = _decimal(body, "quantity")
    if quantity is None or quantity == 0:
        raise bad_request("bad_quantity", "quantity is required and must not be 0")
    price = _decimal(body, "price")
    if price is not None and price < 0:
        raise bad_request("bad_price", "price must be >= 0")
    executed_text = _text(body, "executed_at", required=True) or ""
    executed_at = parse_time("executed_at", executed_text, assume_utc=False)
    contract = _text(body, "contract_key", required=False)
    values: dict[str, Any] = {
        "broker": broker,
        "account_id": _text(body, "account_id", required=True),
        "contract_key": None if contract is None else parse_contract_key("contract_key", contract),
        "symbol": _text(body, "symbol", required=True),
        "side": side,
        "quantity": quantity,
        "price": price,
        "executed_at": executed_at,
        "note": _text(body, "note", required=False, limit=2000),
    }
    trade_id = _text(body, "broker_trade_id", required=False) or _derived_id(values)
    return Trade(
        broker=broker,
        broker_trade_id=trade_id,
        account_id=values["account_id"],
        contract_key=values["contract_key"],
        symbol=values["symbol"],
        side=side,
        quantity=quantity,
        price=price,
        executed_at=executed_at,
        source="strategy",
        note=values["note"],
    )


def _same_entry(stored: dict[str, Any], trade: Trade) -> bool:
    given = {f.name: getattr(trade, f.name) for f in fields(trade)}
    return all(stored[name] == given[name] for name in SAME_ENTRY)


@bp.post("/v1/trades")
@requires_token
async def add_trade() -> Response:
    body = await json_body(required=True)
    assert body is not None
    trade = parse_trade(body)
    reads = current_state().reads
    async with reads.connection() as conn:
        row, created = await reads.run(record_trade, conn, trade)
    if not created and not _same_entry(row, trade):
        raise ApiError(
            409,
            "trade_id_conflict",
            f"{trade.broker} trade {trade.broker_trade_id!r} is already stored with "
            "different values",
        )
    return json_response(row, 201 if created else 200)


def _string(max_length: int = MAX_TEXT) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": NO_NUL}


_TRADE_SCHEMA = {
    "type": "object",
    "required": ["broker", "account_id", "symbol", "side", "quantity", "executed_at"],
    "additionalProperties": False,
    "properties": {
        "broker": {"type": "string", "enum": list(trade_brokers())},
        "account_id": _string(),
        "symbol": _string(),
        "side": {"type": "string", "enum": ["buy", "sell"]},
        "quantity": {
            "type": "number",
            "not": {"const": 0},
            "exclusiveMinimum": -int(MAX_ABS_NUMBER),
            "exclusiveMaximum": int(MAX_ABS_NUMBER),
        },
        "price": {"type": "number", "minimum": 0, "exclusiveMaximum": int(MAX_ABS_NUMBER)},
        "executed_at": {
            "type": "string",
            "format": "date-time",
            "description": "With an offset; its UTC instant within years 1..9999.",
        },
        "contract_key": _string(),
        "broker_trade_id": _string(),
        "note": _string(2000),
    },
}
PATHS: dict[str, Any] = {
    "/v1/trades": {
        "get": {
            "summary": "Trades in (executed_at, id) order, paged like snapshots.",
            "parameters": [
                *[p for p in FILTERS if p["name"] != "underlying"],
                *LIMIT_AND_CURSOR,
                FORMAT,
            ],
            "responses": ROWS_RESPONSES,
        },
        "post": {
            "summary": "Append a strategy-log entry; idempotent on (broker, broker_trade_id).",
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _TRADE_SCHEMA}},
            },
            "responses": {
                "201": {"description": "Stored"},
                "200": {"description": "Already stored (same entry)"},
                **GUARDED_ERRORS,
                "409": ERROR,
                "503": ERROR,
            },
        },
    }
}
