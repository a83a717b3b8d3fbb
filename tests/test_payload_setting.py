"""GREEKSD_STORE_PAYLOAD: off (the default) stores rows without their raw event and the
Connections do not build it; on keeps it. Either way every other column is the same,
in the table and through the spool."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from greeksd.brokers.ibkr import protocol as ib
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.model import Contract, ContractKey, OptionRight, keeping_payload
from greeksd.replay import replay_fixture
from greeksd.store.columns import COPY_COLUMNS
from greeksd.store.spool import Spool
from greeksd.store.writer import Writer
from tests.factories import make_snapshot
from tests.helpers import fetch_rows
from tests.test_spool import SwitchableDatabase

FIXTURE = Path(__file__).parent / "fixtures" / "mixed-session.jsonl.gz"
RECEIVED = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
# Every column the writer sends but the payload (persisted_at is the server's clock).
COMPARED = ", ".join(c for c in COPY_COLUMNS if c != "source_payload")
ORDER = "broker, account_id, contract_key, event_time, fingerprint"


def _rows(url: str) -> list[tuple[Any, ...]]:
    return fetch_rows(url, f"SELECT {COMPARED} FROM greek_snapshots ORDER BY {ORDER}")


def _payloads(url: str) -> list[Any]:
    return [r[0] for r in fetch_rows(url, "SELECT source_payload FROM greek_snapshots")]


async def test_replayed_rows_are_identical_but_for_the_payload(
    db_url: str, other_db_url: str
) -> None:
    await replay_fixture(db_url, FIXTURE, store_payload=True)
    await replay_fixture(other_db_url, FIXTURE)  # the default: lean rows
    kept, lean = _rows(db_url), _rows(other_db_url)
    assert len(kept) > 1000 and {r[0] for r in kept} == {"ibkr", "tastytrade"}
    assert lean == kept
    assert set(_payloads(other_db_url)) == {None}
    stored = fetch_rows(
        db_url,
        "SELECT broker, bool_and(source_payload IS NOT NULL),"
        " bool_or(source_payload ? 'eventType'), bool_or(source_payload ? '31')"
        " FROM greek_snapshots GROUP BY broker ORDER BY broker",
    )
    # IBKR rows keep the merged smd fields (31: last), DXLink rows the feed event.
    assert stored == [("ibkr", True, False, True), ("tastytrade", True, True, False)]


def test_connections_build_no_payload_when_it_is_not_kept() -> None:
    key = ContractKey("SPY", date(2026, 12, 18), OptionRight.CALL, Decimal(600))
    contract = Contract(key, "SPY", Decimal(100), Decimal(2), "A1")
    mapper = dx.SnapshotMapper()
    mapper.set_contracts([contract])
    event = {"eventType": "Greeks", "eventSymbol": dx.streamer_symbol(key), "delta": 0.4}
    book = ib.MarketDataBook()
    book.track(ib.OptionPosition(1, None, contract))

    def rows(keep: bool) -> tuple[Any, Any]:
        with keeping_payload(keep):
            (dx_row,), _ = mapper.map([event], RECEIVED)
            ib_row = book.apply(ib.MarketData(1, {"7308": str(keep)}, None), RECEIVED)
        assert ib_row is not None and dx_row.delta == 0.4
        return dx_row.source_payload, ib_row.source_payload

    assert rows(True) == (event, {"7308": "True"})
    assert rows(False) == (None, None)


@pytest.mark.parametrize("store_payload", [True, False])
async def test_spooled_rows_round_trip_with_or_without_the_payload(
    db_url: str,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    store_payload: bool,
) -> None:
    database = SwitchableDatabase()
    database.up = False
    spool = Spool(tmp_path / "s.spool", max_bytes=10_000_000)
    writer = Writer(db_url, store_payload=store_payload, spool=spool, connect=database)
    batch = [make_snapshot(i) for i in range(5)]
    await writer.write_batch(batch)
    (spooled,) = list(spool.batches())
    assert [replace(s, source_payload=None) for s in spooled] == [
        replace(s, source_payload=None) for s in batch
    ], "every other field exactly as given"
    assert [s.source_payload for s in spooled] == (
        [{"seq": i} for i in range(5)] if store_payload else [None] * 5
    )
    database.up = True
    await trio.sleep(5.1)  # virtual: past the longest retry delay, so the next batch tries
    await writer.write_batch([make_snapshot(5)])
    assert not spool
    stored = fetch_rows(
        db_url, "SELECT source_payload FROM greek_snapshots ORDER BY event_time, fingerprint"
    )
    assert [r[0] for r in stored] == (
        [{"seq": i} for i in range(6)] if store_payload else [None] * 6
    )
