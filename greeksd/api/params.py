"""Reading what a client sent: query parameters and JSON bodies, each refused with a
4xx that names the parameter and what was wrong with it.

Times are ISO 8601. A time without an offset is taken as UTC (documented), so
`?start=2026-11-25T15:30` works from a shell; `Z` or an offset is honoured. A `+` in a
query string decodes to a space, which gets its own hint.

Everything PostgreSQL would refuse, or the API could not render back, is refused here
with a 400 before it reaches the database: NUL bytes in any string, times whose UTC
instant falls outside years 1..9999, numbers outside what the API renders exactly.
An empty query parameter (`?broker=`) is refused too (the OpenAPI document says
`minLength: 1`): treating it as absent would silently widen the query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from quart import request

from greeksd.api.errors import ApiError, bad_request
from greeksd.brokers import registry
from greeksd.model import ContractKey
from greeksd.sources import parse_instance, parse_source
from greeksd.store.queries import Filter

FORMATS: tuple[str, ...] = ("json", "ndjson", "csv")
DEFAULT_LIMIT = 1000
MAX_LIMIT = 50_000
FILTER_PARAMS: tuple[str, ...] = ("broker", "account", "contract_key", "underlying", "start", "end")
SNAPSHOT_FILTER_PARAMS: tuple[str, ...] = (*FILTER_PARAMS, "source", "instance")
"""The snapshot routes also filter on which source received a row and which instance
wrote it (greek_snapshots' `source` and `instance` columns)."""
MAX_BODY_BYTES = 64 * 1024


def check_text(name: str, value: str) -> str:
    """PostgreSQL text cannot hold a NUL byte; refuse it rather than fail in the driver."""
    if "\x00" in value:
        raise bad_request(f"bad_{name}", f"{name} must not contain a NUL byte (\\u0000)")
    return value


def parse_time(name: str, text: str, *, assume_utc: bool = True) -> datetime:
    """ISO 8601; without an offset it is UTC, or refused when `assume_utc` is False
    (a stored fact such as a trade's execution time must not guess its zone)."""
    try:
        value = datetime.fromisoformat(check_text(name, text))
    except ValueError:
        hint = " (write '+' in a URL as %2B, or use Z)" if " " in text else ""
        raise bad_request("bad_time", f"{name}={text!r} is not an ISO 8601 time{hint}") from None
    if value.tzinfo is None:
        if not assume_utc:
            raise bad_request(
                "bad_time", f"{name} needs a timezone offset, e.g. 2026-11-25T15:30:00Z"
            )
        value = value.replace(tzinfo=UTC)
    try:
        # A time whose UTC instant leaves years 1..9999 (0001-01-01T00:00+14:00) would be
        # stored but could never be read back into Python.
        value.astimezone(UTC)
    except OverflowError:
        raise bad_request(
            "bad_time", f"{name}={text!r} is outside 0001-01-01..9999-12-31 in UTC"
        ) from None
    return value


def parse_contract_key(name: str, text: str) -> str:
    """Validated and in canonical form, so '190.0' finds the rows stored as '190'."""
    try:
        return str(ContractKey.parse(text))
    except ValueError as exc:
        raise bad_request("bad_contract_key", f"{name}: {exc}") from None


def parse_broker(text: str, allowed: Iterable[str] | None = None) -> str:
    """One of `allowed` (default: every registered broker)."""
    names = registry.names() if allowed is None else tuple(allowed)
    if text not in names:
        raise bad_request(
            "unknown_broker", f"broker={text!r} is not one of {', '.join(names) or '(none)'}"
        )
    return text


def parse_checked(name: str, text: str, check: Callable[[str], str]) -> str:
    """`text` as `check` accepts it, else a 400 `bad_<name>` saying why."""
    try:
        return check(text)
    except ValueError as exc:
        raise bad_request(f"bad_{name}", f"{name}={text!r}: {exc}") from None


class Args:
    """The request's query string, restricted to `allowed` names (a typo such as
    `acount=` is an error, not a silently ignored filter)."""

    def __init__(self, *allowed: str) -> None:
        self._args = request.args
        for name in self._args:
            if name not in allowed:
                raise bad_request(
                    "unknown_parameter",
                    f"unknown query parameter {name!r}; this route takes {', '.join(allowed)}",
                )
            if len(self._args.getlist(name)) > 1:
                raise bad_request("repeated_parameter", f"query parameter {name!r} given twice")

    def text(self, name: str) -> str | None:
        value = self._args.get(name)
        if value == "":
            raise bad_request("empty_parameter", f"query parameter {name!r} is empty")
        return None if value is None else check_text(name, value)

    def time(self, name: str) -> datetime | None:
        text = self.text(name)
        return None if text is None else parse_time(name, text)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.text(name) or default
        if value not in options:
            raise bad_request(f"bad_{name}", f"{name}={value!r} is not one of {', '.join(options)}")
        return value

    def limit(self) -> int:
        text = self.text("limit")
        if text is None:
            return DEFAULT_LIMIT
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise bad_request(
                "bad_limit", f"limit={text!r} must be an integer from 1 to {MAX_LIMIT}"
            )
        return int(text)

    def filter(self) -> Filter:
        broker = self.text("broker")
        contract = self.text("contract_key")
        source = self.text("source")
        instance = self.text("instance")
        f = Filter(
            broker=None if broker is None else parse_broker(broker),
            account_id=self.text("account"),
            contract_key=None if contract is None else parse_contract_key("contract_key", contract),
            underlying=self.text("underlying"),
            source=None if source is None else parse_checked("source", source, parse_source),
            instance=None
            if instance is None
            else parse_checked("instance", instance, parse_instance),
            start=self.time("start"),
            end=self.time("end"),
        )
        if f.start is not None and f.end is not None and f.start >= f.end:
            raise bad_request("bad_time_range", "start must be before end")
        return f


async def json_body(*, required: bool) -> dict[str, Any] | None:
    """The body as a JSON object; None when it is empty and not required."""
    data = await request.get_data(cache=True, as_text=False)
    if not data and not required:
        return None
    if request.mimetype != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as application/json, not {request.mimetype or 'no content type'}",
        )
    if len(data) > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise bad_request("malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("malformed_json", "the body must be a JSON object")
    return body


def reject_unknown_fields(body: dict[str, Any], allowed: Iterable[str]) -> None:
    names = tuple(allowed)
    unknown = sorted(set(body) - set(names))
    if unknown:
        raise bad_request(
            "unknown_field", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(names)}"
        )
