"""The snapshot row's columns: the one list every shape of a row is derived from.

`COLUMNS` names each column of `greek_snapshots` in table order with its binary COPY
type, how its value is encoded for COPY and for a spool record (JSON) and decoded back,
whether the API's queries return it, and whether it is part of the values' fingerprint.
From it, once at import:

- `COPY_COLUMNS` / `COPY_TYPES`: what the writer's binary COPY sends, and as which types;
- `snapshot_row`: a Snapshot (and the writer's instance name) as the tuple COPY writes
  (fingerprint last);
- `snapshot_to_dict` / `snapshot_from_dict`: a Snapshot as a spool (or rejected-batch)
  record and back;
- `SNAPSHOT_COLUMNS`: what the read queries return;
- `FINGERPRINTED`: the value columns the fingerprint covers.

`snapshot_row` runs once per row on the writer's hot path, so the three functions are
generated as plain Python source from the table (each column's encoding is an expression
template over a local `{v}`) and compiled once: per row they cost what the hand-written
versions did, with no loop over column objects. `ENCODER_SOURCE` holds that source.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from psycopg.types.json import Jsonb

from greeksd.model import OptionRight, Snapshot


@dataclass(frozen=True)
class Codec:
    """How one kind of value travels, as expression templates over `{v}`: to the COPY
    tuple, to a JSON record, back from one, and into the fingerprint (from the COPY
    value). Templates may use the names in `_NAMES`."""

    copy: str = "{v}"
    to_json: str = "{v}"
    from_json: str = "{v}"
    fingerprint: str | None = None


# NaN/inf never reach the table or a record: a broker's 'no value' is NULL.
_FINITE = "({v} if {v} is None or {v} - {v} == 0.0 else None)"

PLAIN = Codec()
RIGHT = Codec(copy="{v}.value", to_json="{v}.value", from_json="_OptionRight({v})")
DATE = Codec(to_json="{v}.isoformat()", from_json="_date.fromisoformat({v})")
DATETIME = Codec(to_json="{v}.isoformat()", from_json="_datetime.fromisoformat({v})")
DECIMAL = Codec(to_json="str({v})", from_json="_Decimal({v})")
OPTIONAL_DECIMAL = Codec(
    to_json="(None if {v} is None else str({v}))",
    from_json="(None if {v} is None else _Decimal({v}))",
    fingerprint="(None if {v} is None else float({v}))",
)
FLOAT = Codec(copy=_FINITE, to_json=_FINITE, fingerprint="{v}")
JSONB = Codec(copy="(None if {v} is None else _Jsonb({v}, dumps=_dumps))")


@dataclass(frozen=True)
class Column:
    """One column of `greek_snapshots`.

    `pg_type` is its binary COPY type (None: the writer does not send it, the server
    fills it). `attribute` is False for a column not read off the Snapshot: the
    fingerprint, computed, and a `parameter`, which `snapshot_row` takes as an argument
    of the same name (the writer's `instance`: whoever writes the row, not whoever
    received it, so it is not in spool records either). `absent_before` names the
    migration that added a column a spool record written by an older greeksd may lack
    (read as None)."""

    name: str
    pg_type: str | None
    codec: Codec = PLAIN
    returned: bool = True
    fingerprinted: bool = False
    attribute: bool = True
    parameter: bool = False
    absent_before: str | None = None


COLUMNS: tuple[Column, ...] = (
    Column("broker", "text"),
    Column("account_id", "text"),
    Column("contract_key", "text"),
    Column("underlying", "text"),
    Column("expiration", "date", DATE),
    Column("strike", "numeric", DECIMAL),
    Column("option_type", "text", RIGHT),
    Column("multiplier", "numeric", OPTIONAL_DECIMAL),
    Column("quantity", "numeric", OPTIONAL_DECIMAL, fingerprinted=True),
    *(
        Column(name, "float8", FLOAT, fingerprinted=True)
        for name in (
            "delta",
            "gamma",
            "theta",
            "vega",
            "rho",
            "implied_volatility",
            "underlying_price",
            "bid",
            "ask",
            "last",
            "mark",
        )
    ),
    Column("event_time", "timestamptz", DATETIME),
    Column("received_at", "timestamptz", DATETIME),
    Column("market_data", "text", absent_before="003"),
    Column("source", "text", absent_before="004"),
    Column("instance", "text", attribute=False, parameter=True),
    Column("source_payload", "jsonb", JSONB, returned=False),
    Column("persisted_at", None, DATETIME),
    Column("fingerprint", "int8", attribute=False),
)

_WRITTEN = tuple(c for c in COLUMNS if c.pg_type is not None)
_ATTRIBUTES = tuple(c for c in COLUMNS if c.attribute and c.pg_type is not None)
_PARAMETERS = tuple(c.name for c in COLUMNS if c.parameter)
COPY_COLUMNS: tuple[str, ...] = tuple(c.name for c in _WRITTEN)
COPY_TYPES: tuple[str, ...] = tuple(c.pg_type for c in _WRITTEN if c.pg_type is not None)
SNAPSHOT_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.returned)
FINGERPRINTED: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.fingerprinted)

_FINGERPRINT_LAYOUT = struct.Struct(f"<{len(FINGERPRINTED)}d")
_NAN = float("nan")


def fingerprint(values: Sequence[float | None]) -> int:
    """A stable 64-bit hash of the `FINGERPRINTED` values (None and NaN alike). Defined
    by bytes, not by Python's hash(), so it is the same in every process and Python
    version, and a fixture replayed next year still recognises its rows."""
    packed = _FINGERPRINT_LAYOUT.pack(*[_NAN if v is None else v for v in values])
    return ((zlib.crc32(packed) << 32) | zlib.adler32(packed)) - (1 << 63)


def _dumps(obj: Any) -> bytes:
    # bytes, not str: psycopg sends them as they are (a str would be encoded again)
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


_NAMES: dict[str, Any] = {
    "_OptionRight": OptionRight,
    "_date": date,
    "_datetime": datetime,
    "_Decimal": Decimal,
    "_Jsonb": Jsonb,
    "_dumps": _dumps,
    "_Snapshot": Snapshot,
    "_fingerprint": fingerprint,
}


def _row_source() -> str:
    lines = [f"def snapshot_row(s, {', '.join(f'{p}=None' for p in _PARAMETERS)}):"]
    for c in _ATTRIBUTES:
        if c.codec.copy.count("{v}") == 1:  # read the attribute once either way
            lines.append(f"    {c.name} = {c.codec.copy.format(v='s.' + c.name)}")
        else:
            lines.append(f"    {c.name} = s.{c.name}")
            lines.append(f"    {c.name} = {c.codec.copy.format(v=c.name)}")
    prints = [
        c.codec.fingerprint.format(v=c.name)
        for c in COLUMNS
        if c.fingerprinted and c.codec.fingerprint is not None
    ]
    assert len(prints) == len(FINGERPRINTED), "a fingerprinted column needs a codec for it"
    values = [
        c.name if c.attribute or c.parameter else f"_fingerprint(({', '.join(prints)},))"
        for c in _WRITTEN
    ]
    lines.append(f"    return ({', '.join(values)},)")
    return "\n".join(lines)


def _to_dict_source() -> str:
    lines = ["def snapshot_to_dict(s):"]
    items = []
    for c in _ATTRIBUTES:
        lines.append(f"    {c.name} = s.{c.name}")
        items.append(f"{c.name!r}: {c.codec.to_json.format(v=c.name)}")
    lines.append(f"    return {{{', '.join(items)}}}")
    return "\n".join(lines)


def _from_dict_source() -> str:
    lines = ["def snapshot_from_dict(d):"]
    arguments = []
    for c in _ATTRIBUTES:
        read = f"d[{c.name!r}]" if c.absent_before is None else f"d.get({c.name!r})"
        lines.append(f"    {c.name} = {read}")
        arguments.append(f"{c.name}={c.codec.from_json.format(v=c.name)}")
    lines.append(f"    return _Snapshot({', '.join(arguments)})")
    return "\n".join(lines)


ENCODER_SOURCE = "\n\n".join((_row_source(), _to_dict_source(), _from_dict_source()))
_compiled: dict[str, Any] = dict(_NAMES)
exec(compile(ENCODER_SOURCE, f"<{__name__} generated>", "exec"), _compiled)

snapshot_row: Callable[..., tuple[Any, ...]] = _compiled["snapshot_row"]
snapshot_row.__doc__ = (
    "A Snapshot as the tuple binary COPY writes (`COPY_COLUMNS` order); `instance=`: "
    "the writing instance's name (None: not known, e.g. a benchmark)."
)
snapshot_to_dict: Callable[[Snapshot], dict[str, Any]] = _compiled["snapshot_to_dict"]
snapshot_to_dict.__doc__ = (
    "A spool record: exact and typed (Decimals and dates as strings, datetimes with "
    "offsets, non-finite floats as None)."
)
snapshot_from_dict: Callable[[dict[str, Any]], Snapshot] = _compiled["snapshot_from_dict"]
snapshot_from_dict.__doc__ = (
    "Inverse of `snapshot_to_dict`; reads records written by earlier versions too."
)
