"""The snapshot row's one column table (greeksd/store/columns.py) against the real table,
the spool records earlier versions wrote, and the fingerprint stored rows carry."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
from hypothesis import given
from hypothesis import strategies as st

from greeksd.model import Broker, OptionRight
from greeksd.store.columns import (
    COLUMNS,
    COPY_COLUMNS,
    COPY_TYPES,
    FINGERPRINTED,
    MEASURES,
    SNAPSHOT_COLUMNS,
    encode_row,
    snapshot_from_dict,
    snapshot_row,
    snapshot_to_dict,
)
from greeksd.store.snapshot_table import COPY_CHUNK_ROWS, CopyRows, copy_rows
from tests.factories import make_snapshot

# what format_type() calls the binary COPY types the table lists
_PG_NAMES = {
    "float8": "double precision",
    "int8": "bigint",
    "timestamptz": "timestamp with time zone",
}


def test_the_column_table_is_the_database_table(db_url: str) -> None:
    """Every column of greek_snapshots is in the table, in order, and the writer's COPY
    types are the columns' own: a migration that adds or retypes a column fails here."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'greek_snapshots'::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
    # char(n) columns take text's binary format
    table = {name: "text" if t.startswith("character(") else t for name, t in rows}
    assert sorted(table) == sorted(c.name for c in COLUMNS)
    copied = {name: _PG_NAMES.get(t, t) for name, t in zip(COPY_COLUMNS, COPY_TYPES, strict=True)}
    assert copied == {name: table[name] for name in COPY_COLUMNS}
    assert set(SNAPSHOT_COLUMNS) <= set(table)


def test_a_record_spooled_by_the_previous_version_still_reads() -> None:
    """The JSON the previous greeksd wrote for one snapshot (before `market_data`, a NaN
    already null): decoded to the same Snapshot, the missing flag as None."""
    record = {
        "broker": "ibkr",
        "account_id": "U1",
        "contract_key": "SPY 2027-01-15 P 512.5",
        "underlying": "SPY",
        "expiration": "2027-01-15",
        "strike": "512.5",
        "option_type": "P",
        "multiplier": "100",
        "quantity": None,
        "delta": -0.4,
        "gamma": None,
        "theta": -0.1,
        "vega": 0.2,
        "rho": None,
        "implied_volatility": 0.3,
        "underlying_price": 510.0,
        "bid": 1.0,
        "ask": 1.1,
        "last": None,
        "mark": 1.05,
        "event_time": "2026-11-25T15:30:00+00:00",
        "received_at": "2026-11-25T15:30:00.250000+00:00",
        "source_payload": {"31": "1.05"},
    }
    s = snapshot_from_dict(record)
    assert (s.broker, s.option_type) == (Broker.IBKR, OptionRight.PUT)
    assert (s.expiration, s.strike, s.multiplier, s.quantity) == (
        date(2027, 1, 15),
        Decimal("512.5"),
        Decimal(100),
        None,
    )
    assert (s.delta, s.gamma, s.mark) == (-0.4, None, 1.05)
    assert s.event_time == datetime(2026, 11, 25, 15, 30, tzinfo=UTC)
    assert s.source_payload == {"31": "1.05"} and s.market_data is None and s.source is None


def test_source_travels_in_spool_records_and_instance_comes_from_the_writer() -> None:
    """The source is the row's (it was received by it); the instance is whoever writes
    the row, so it is not in a spool record, and neither is in the fingerprint."""
    snapshot = make_snapshot(0, source="ibkr:alice")
    assert snapshot_from_dict(snapshot_to_dict(snapshot)).source == "ibkr:alice"
    assert "instance" not in snapshot_to_dict(snapshot)
    row = snapshot_row(snapshot, "desk-1")
    assert row[COPY_COLUMNS.index("source")] == "ibkr:alice"
    assert row[COPY_COLUMNS.index("instance")] == "desk-1"
    other = snapshot_row(replace(snapshot, source="ibkr:bob"), "desk-2")
    assert other[-1] == row[-1]  # the same values: the same fingerprint
    assert {"source", "instance"} & set(FINGERPRINTED) == set()


def test_the_fingerprint_is_the_one_stored_rows_carry() -> None:
    """Pinned to the value the previous (hand-written) encoder gave this snapshot, so
    rows already stored, or replayed from an old fixture, are still recognised."""
    snapshot = replace(make_snapshot(0), rho=None, bid=float("nan"))
    row = snapshot_row(snapshot)
    assert row[-1] == -4632478493408616509
    assert row[COPY_COLUMNS.index("bid")] is None and row[COPY_COLUMNS.index("rho")] is None


def _stored(conn: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    columns = ", ".join(f"{c}::text" for c in COPY_COLUMNS)
    return conn.execute(f"SELECT {columns} FROM {table} ORDER BY {columns}").fetchall()


def _stored_both_ways(
    db_url: str, chunks: Iterable[bytes], rows: Sequence[Sequence[Any]]
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """What the table holds after greeksd's binary COPY of `chunks`, and after psycopg's
    own COPY of the same `rows` (snapshot_row's values), each into a fresh table."""
    with psycopg.connect(db_url) as conn:
        for table in ("by_psycopg", "by_greeksd"):
            conn.execute(f"CREATE TEMP TABLE {table} (LIKE greek_snapshots INCLUDING DEFAULTS)")
        with conn.cursor() as cur:
            copy_rows(
                cur,
                f"COPY by_greeksd ({', '.join(COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)",
                chunks,
            )
            with cur.copy(
                f"COPY by_psycopg ({', '.join(COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(COPY_TYPES)
                for row in rows:
                    copy.write_row(row)
        return _stored(conn, "by_greeksd"), _stored(conn, "by_psycopg")


def test_encode_row_stores_what_psycopg_stores_from_snapshot_row(db_url: str) -> None:
    """The writer's own binary rows and psycopg's COPY of the same snapshots' tuples
    leave the same text in every column: NULLs, non-finite floats, numerics equal but
    written differently (1 and 1.0, both in one batch), other time zones, dates before
    2000, payloads and none."""
    east = timezone(timedelta(hours=5, minutes=30))
    one, one_point_oh = Decimal("1"), Decimal("1.0")
    snapshots = [
        make_snapshot(0),
        make_snapshot(1, rho=None, bid=float("nan"), ask=float("inf"), source_payload=None),
        make_snapshot(2, multiplier=one, quantity=one_point_oh, market_data="delayed"),
        make_snapshot(3, multiplier=one_point_oh, quantity=one, source="ibkr:alice"),
        make_snapshot(
            4,
            event_time=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=east),
            expiration=date(1999, 1, 15),
            quantity=None,
            source_payload={"7308": "0.5", "nested": [1, None, "é"]},
        ),
    ]
    by_greeksd, by_psycopg = _stored_both_ways(
        db_url,
        CopyRows(snapshots * 2, "desk-1").chunks(),
        [snapshot_row(s, "desk-1") for s in snapshots * 2],
    )
    assert len(by_psycopg) == 10
    assert by_greeksd == by_psycopg


def test_copy_rows_encodes_each_chunk_once_and_sends_the_same_bytes_again() -> None:
    """The writer's COPY data: every row in order across chunk boundaries, and a second
    pass (the staging write after a duplicate, a retry), even after a first pass cut
    short by a failure, sends the very chunks encoded the first time."""
    base = make_snapshot()
    snapshots = [
        replace(base, event_time=base.event_time + timedelta(milliseconds=i))
        for i in range(COPY_CHUNK_ROWS * 2 + 7)
    ]
    rows = CopyRows(snapshots, "desk-1")
    first = next(rows.chunks())  # a COPY that failed after its first chunk
    chunks = list(rows.chunks())
    assert len(rows) == len(snapshots)
    assert [len(c) for c in chunks] == [len(first)] * 2 + [len(chunks[-1])]
    assert b"".join(chunks) == b"".join(encode_row(s, "desk-1") for s in snapshots)
    assert chunks[0] is first
    assert all(a is b for a, b in zip(chunks, rows.chunks(), strict=True))


def test_the_remembered_identity_follows_every_change_of_a_contracts_objects(
    db_url: str,
) -> None:
    """`encode_row` remembers a contract's identity fields (broker to quantity) as one
    entry under its key text: rows of that key text with another quantity, multiplier
    or account (objects equal or not: 1 and 1.0), another broker, or the very same
    snapshot changed in place, must each be written as psycopg writes them."""
    base = make_snapshot(0, quantity=Decimal("2"), multiplier=Decimal("100"))
    key = base.contract_key
    one, one_point_oh = Decimal("1"), Decimal("1.0")
    variants = [
        base,
        replace(base, quantity=Decimal("-3")),
        replace(base, quantity=one),
        replace(base, quantity=one_point_oh),
        replace(base, quantity=None),
        replace(base, multiplier=one_point_oh),
        replace(base, account_id="U2"),
        replace(base, broker=Broker.IBKR),
        replace(base, underlying="SPX"),
        replace(base, strike=Decimal("180.0")),
        base,
    ]
    assert all(v.contract_key is key for v in variants)
    in_place = replace(base)
    encoded, expected = [], []
    for quantity in (Decimal("5"), one, one_point_oh, Decimal("5")):
        in_place.quantity = quantity  # the same Snapshot object, changed between rows
        encoded.append(encode_row(in_place, "desk-1"))
        expected.append(snapshot_row(in_place, "desk-1"))
    encoded += [encode_row(v, "desk-1") for v in variants]
    expected += [snapshot_row(v, "desk-1") for v in variants]
    stored, by_psycopg = _stored_both_ways(db_url, [b"".join(encoded)], expected)
    assert len(stored) == len(expected)
    assert stored == by_psycopg
    # numerics stored as text keep their scale: 1 and 1.0 both made it
    quantities = {row[COPY_COLUMNS.index("quantity")] for row in stored}
    assert {"1", "1.0", "5", "-3", None} <= quantities


@given(st.lists(st.floats() | st.none(), min_size=11, max_size=11), st.decimals() | st.none())
def test_encode_row_writes_the_fingerprint_snapshot_row_computes(
    measures: list[float | None], quantity: Decimal | None
) -> None:
    """`encode_row` writes the fingerprint's int8 straight from the two checksums; the
    bytes are those of `snapshot_row`'s fingerprint (negative or not), whatever the
    values (NaN, infinities, None, any quantity)."""
    if quantity is not None and quantity.is_snan():
        quantity = None  # float() refuses a signalling NaN, in both
    values: dict[str, Any] = dict(zip(MEASURES, measures, strict=True))
    snapshot = replace(make_snapshot(0), quantity=quantity, **values)
    assert encode_row(snapshot)[-12:] == struct.pack(">iq", 8, snapshot_row(snapshot)[-1])
