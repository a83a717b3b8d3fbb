"""The snapshot row's columns: the one list every shape of a row is derived from.

`COLUMNS` names each column of `greek_snapshots` in table order with its binary COPY
type, how its value is encoded for COPY and for a spool record (JSON) and decoded back,
whether the API's queries return it, and whether it is part of the values' fingerprint.
From it, once at import:

- `COPY_COLUMNS` / `COPY_TYPES`: what the writer's binary COPY sends, and as which types;
- `snapshot_row`: a Snapshot (and the writer's instance name) as the tuple psycopg's
  COPY would write (fingerprint last);
- `encode_row`: the same row already in COPY's binary format (the writer's hot path);
- `snapshot_to_dict` / `snapshot_from_dict`: a Snapshot as a spool (or rejected-batch)
  record and back;
- `SNAPSHOT_COLUMNS`: what the read queries return;
- `FINGERPRINTED`: the value columns the fingerprint covers.

The row functions run once per row, so they are generated as plain Python source from
the table (each column's encoding is an expression template over a local `{v}`) and
compiled once: per row they cost what hand-written versions would, with no loop over
column objects. `ENCODER_SOURCE` holds that source.

`encode_row` is what the writer COPYs. Handing psycopg a tuple cost ~10 µs a row (a
dumper call per value, Decimals to numeric digit by digit), more than decoding the tick.
So it writes each field itself: floats, timestamps, the fingerprint and the payload with
`struct` (the same bytes as psycopg's binary dumpers, checked in tests/test_columns.py),
and the values that repeat row after row (text, dates, numerics: the contract's identity,
broker, source, instance) through psycopg's own dumper once per distinct object,
remembered by identity (never by equality: `Decimal('1')` and `Decimal('1.0')` are equal
but are different numerics). A contract's identity columns (broker to quantity) are
remembered together, one lookup for the nine, as long as the row's objects are the
very ones remembered.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import Format
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


MEASURES: tuple[str, ...] = (
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
"""A row's Greeks and prices (float8 columns), in table order."""


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
    *(Column(name, "float8", FLOAT, fingerprinted=True) for name in MEASURES),
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
    return _fingerprint_of(_FINGERPRINT_LAYOUT.pack(*[_NAN if v is None else v for v in values]))


def _fingerprint_of(packed: bytes) -> int:
    """`fingerprint` of the values already packed (the row functions pack them inline)."""
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
    "_fingerprint_of": _fingerprint_of,
    "_pack_fp": _FINGERPRINT_LAYOUT.pack,
    "_NAN": _NAN,
}


def _row_body(raw: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, str]]:
    """The lines that compute each written column's COPY value into a local of its name
    (the columns in `raw` are left to the caller), and each column's value expression."""
    lines = []
    for c in _ATTRIBUTES:
        if c.name in raw:
            continue
        if c.codec.copy.count("{v}") == 1:  # read the attribute once either way
            lines.append(f"    {c.name} = {c.codec.copy.format(v='s.' + c.name)}")
        else:
            lines.append(f"    {c.name} = s.{c.name}")
            lines.append(f"    {c.name} = {c.codec.copy.format(v=c.name)}")
    prints = [
        (c.name, c.codec.fingerprint.format(v=c.name))
        for c in COLUMNS
        if c.fingerprinted and c.codec.fingerprint is not None
    ]
    assert len(prints) == len(FINGERPRINTED), "a fingerprinted column needs a codec for it"
    # A fingerprint codec is None exactly when its value is: test the value, so a
    # conversion (a Decimal's float) runs once
    packed = ", ".join(f"_NAN if {name} is None else {p}" for name, p in prints)
    values = {
        c.name: c.name if c.attribute or c.parameter else f"_fingerprint_of(_pack_fp({packed}))"
        for c in _WRITTEN
    }
    return lines, values


def _row_source() -> str:
    lines, values = _row_body()
    signature = f"def snapshot_row(s, {', '.join(f'{p}=None' for p in _PARAMETERS)}):"
    return "\n".join([signature, *lines, f"    return ({', '.join(values.values())},)"])


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


# ---- binary COPY rows ----------------------------------------------------------------
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\0" + bytes(8)  # header: no flags, no extension
COPY_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MEMO_LIMIT = 4096  # distinct objects per column before its memo starts over
# The column types whose values repeat from row to row: dumped once per value, or per
# object where equal values may differ in bytes (numeric: 1 and 1.0).
_MEMO_TYPES = frozenset({"text", "date", "numeric"})
_BY_VALUE = frozenset({"text", "date"})
_RUN_KEY = "contract_key"
"""The column whose object keys the identity run's memo: one per contract (the key text
a `Contract` renders once), where the other identity columns repeat across contracts."""


def _dumper(pg_type: str) -> Callable[[Any], Any]:
    """psycopg's binary dump of one value as `pg_type`, the way its COPY picks it after
    `set_types`."""
    transformer = Transformer()
    transformer.set_dumper_types([psycopg.adapters.types[pg_type].oid], Format.BINARY)
    formats = [PyFormat.BINARY]
    return lambda v: transformer.dump_sequence([v], formats)[0]


def _field(data: bytes | None) -> bytes:
    """A value as one binary COPY field: its length, then its bytes (NULL: -1)."""
    return _NULL if data is None else _I4(len(data)) + bytes(data)


def _remember(memo: dict[Any, Any], dump: Callable[[Any], Any], v: Any, key: Any) -> bytes:
    """Dump `v` with psycopg and remember it under `key`: `v` itself, or its id (the
    entry then holds `v` too, to check it and to keep the id from being reused)."""
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()  # more distinct values than any book holds: rows from records
    field = _field(None if v is None else dump(v))
    memo[key] = field if key is v else (v, field)
    return field


_US = timedelta(microseconds=1)


_I4 = struct.Struct(">i").pack
_F_F8 = struct.Struct(">id").pack
_F_I8 = struct.Struct(">iq").pack
_BINARY: dict[str, str] = {  # each other type as a field: an expression over `{v}`
    "float8": "(_NULL if {v} is None else _F_F8(8, {v}))",
    "int8": "_F_I8(8, {v})",
    # psycopg's DatetimeBinaryDumper: microseconds since 2000-01-01 UTC (exact)
    "timestamptz": "_F_I8(8, ({v} - _PG_EPOCH) // _US)",
    # psycopg's JsonbBinaryDumper: format version 1, then the JSON
    "jsonb": "(_NULL if {v} is None else _field(b'\\x01' + _dumps({v})))",
}
# `_fingerprint_of(fp)` as an int8 field without the 64-bit int: subtracting 2**63 from
# (crc << 32 | adler) flips its top bit, so its big-endian bytes are crc's with the top
# bit flipped, then adler's
_FINGERPRINT_FIELD = "_F_FP(8, _crc32(fp) ^ 0x80000000, _adler32(fp))"
_BINARY_NAMES: dict[str, Any] = {
    "_F_FP": struct.Struct(">iII").pack,
    "_crc32": zlib.crc32,
    "_adler32": zlib.adler32,
    "_NULL": _NULL,
    "_F_F8": _F_F8,
    "_F_I8": _F_I8,
    "_PG_EPOCH": _PG_EPOCH,
    "_US": _US,
    "_field": _field,
    "_remember": _remember,
}


def _identity_run() -> list[Column]:
    """The run of remembered columns around `_RUN_KEY`: attributes next to each other in
    the table (the contract's identity, broker to quantity), written as one memo entry."""
    at = next(i for i, c in enumerate(_WRITTEN) if c.name == _RUN_KEY)
    start, end = at, at + 1
    while (
        start > 0 and _WRITTEN[start - 1].pg_type in _MEMO_TYPES and _WRITTEN[start - 1].attribute
    ):
        start -= 1
    while end < len(_WRITTEN) and _WRITTEN[end].pg_type in _MEMO_TYPES and _WRITTEN[end].attribute:
        end += 1
    return list(_WRITTEN[start:end])


def _memo_lines(c: Column) -> list[str]:
    """`f_<name>`, the field of remembered column `c`, from its own memo."""
    if c.pg_type in _BY_VALUE:
        return [
            f"f_{c.name} = _memo_{c.name}.get({c.name})"
            f" or _remember(_memo_{c.name}, _dump_{c.name}, {c.name}, {c.name})"
        ]
    return [
        f"e = _memo_{c.name}.get(id({c.name}))",
        f"f_{c.name} = e[1] if e is not None and e[0] is {c.name} else "
        f"_remember(_memo_{c.name}, _dump_{c.name}, {c.name}, id({c.name}))",
    ]


def _encode_source() -> str:
    """`encode_row`: snapshot_row's values, each written as a binary COPY field. A
    remembered column is looked up by its raw value; its codec runs on a miss only.

    The identity run (`_identity_run`) is one lookup instead of one per column: an entry
    keyed by the id of the row's `_RUN_KEY` holds the run's objects, their fields joined,
    and their fingerprint values; it is used only when every one of the row's objects
    *is* the entry's (so a changed quantity, multiplier or account, or any other object
    equal or not, takes the per-column memos, and the entry is replaced). The entry
    keeps its objects alive, so an id in the memo is never reused by another object."""
    memo = [c for c in _WRITTEN if c.pg_type in _MEMO_TYPES]
    assert all(c.codec.copy == "{v}" for c in memo if c.fingerprinted), "fingerprints raw"
    run = _identity_run()
    run_prints = [c for c in run if c.fingerprinted]
    # jsonb: the dict itself, not the Jsonb wrapper snapshot_row hands psycopg
    raw = [c for c in _WRITTEN if c.pg_type == "jsonb"]
    lines, values = _row_body(frozenset(c.name for c in memo + raw))
    for c in run_prints:  # the fingerprint takes these from the run's entry
        packed = f"_NAN if {c.name} is None else {c.codec.fingerprint.format(v=c.name)}"  # type: ignore[union-attr]
        assert packed in values["fingerprint"], f"{c.name} not in the fingerprint"
        values["fingerprint"] = values["fingerprint"].replace(packed, f"fp_{c.name}")
    source = [
        f"def _dump_{c.name}(v):\n    return _psycopg_{c.pg_type}({c.codec.copy.format(v='v')})"
        for c in memo
    ]
    lines.insert(0, f"def encode_row(s, {', '.join(f'{p}=None' for p in _PARAMETERS)}):")
    names = [c.name for c in run]
    lines += [f"    {name} = s.{name}" for name in names]
    entry = len(run)
    lines += [
        f"    e = _memo_run.get(id({_RUN_KEY}))",
        "    if e is not None and "
        + " and ".join(f"e[{i}] is {name}" for i, name in enumerate(names))
        + ":",
        f"        f_run = e[{entry}]",
        *(f"        fp_{c.name} = e[{entry + 1 + i}]" for i, c in enumerate(run_prints)),
        "    else:",
        *(f"        {line}" for c in run for line in _memo_lines(c)),
        f"        f_run = b''.join(({', '.join('f_' + name for name in names)},))",
        *(
            f"        fp_{c.name} = _NAN if {c.name} is None else "
            f"{c.codec.fingerprint.format(v=c.name)}"  # type: ignore[union-attr]
            for c in run_prints
        ),
        "        if len(_memo_run) >= _MEMO_LIMIT:",
        "            _memo_run.clear()",
        f"        _memo_run[id({_RUN_KEY})] = ({', '.join(names)}, f_run, "
        f"{', '.join('fp_' + c.name for c in run_prints)})",
    ]
    for c in _WRITTEN:
        assert c.pg_type is not None
        if c in run:
            continue
        if (c in memo or c in raw) and c.attribute:
            lines.append(f"    {c.name} = s.{c.name}")
        if c in memo:
            lines += [f"    {line}" for line in _memo_lines(c)]
        elif c.name == "fingerprint":
            packed = values[c.name].removeprefix("_fingerprint_of(").removesuffix(")")
            assert packed != values[c.name], "the fingerprint is _fingerprint_of(packed)"
            lines += [f"    fp = {packed}", f"    f_{c.name} = {_FINGERPRINT_FIELD}"]
        else:
            lines.append(f"    f_{c.name} = {_BINARY[c.pg_type].format(v=values[c.name])}")
    fields = ["f_run"] + [f"f_{c.name}" for c in _WRITTEN if c not in run]
    lines.append(f"    return b''.join((_COUNT, {', '.join(fields)}))")
    return "\n\n".join([*source, "\n".join(lines)])


def _binary_names() -> dict[str, Any]:
    """What `encode_row` uses: psycopg's dumper per remembered type, a memo per column,
    the identity run's memo."""
    names: dict[str, Any] = {
        "_COUNT": struct.pack(">h", len(_WRITTEN)),
        "_memo_run": {},
        "_MEMO_LIMIT": _MEMO_LIMIT,
    }
    for c in _WRITTEN:
        if c.pg_type in _MEMO_TYPES:
            names[f"_memo_{c.name}"] = {}
            names[f"_psycopg_{c.pg_type}"] = _dumper(c.pg_type)
    return names


ENCODER_SOURCE = "\n\n".join(
    (_row_source(), _encode_source(), _to_dict_source(), _from_dict_source())
)
_compiled: dict[str, Any] = {**_NAMES, **_BINARY_NAMES, **_binary_names()}
exec(compile(ENCODER_SOURCE, f"<{__name__} generated>", "exec"), _compiled)

snapshot_row: Callable[..., tuple[Any, ...]] = _compiled["snapshot_row"]
snapshot_row.__doc__ = (
    "A Snapshot as the tuple binary COPY writes (`COPY_COLUMNS` order); `instance=`: "
    "the writing instance's name (None: not known, e.g. a benchmark)."
)
encode_row: Callable[..., bytes] = _compiled["encode_row"]
encode_row.__doc__ = (
    "`snapshot_row`'s row as one binary COPY tuple (field count, then each field), "
    "ready to follow `COPY_SIGNATURE` in a `FORMAT BINARY` COPY."
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
