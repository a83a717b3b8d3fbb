"""SC-005: the mixed IBKR + Tastytrade fixture replayed, then one cross-broker query
through the API returns every row with every required field, and one contract_key per
option whichever broker reported it."""

from __future__ import annotations

from pathlib import Path

from greeksd.replay import replay_fixture
from tests.api_harness import open_api
from tests.helpers import count_rows

FIXTURE = Path(__file__).parent / "fixtures" / "mixed-session.jsonl.gz"
REQUIRED = (
    "broker",
    "account_id",
    "contract_key",
    "underlying",
    "expiration",
    "strike",
    "option_type",
    "multiplier",
    "quantity",
    "event_time",
    "received_at",
    "persisted_at",
)


async def test_cross_broker_query_returns_every_row_complete_with_one_key_per_option(
    db_url: str, tmp_path: Path
) -> None:
    await replay_fixture(db_url, FIXTURE)
    stored = count_rows(db_url)
    async with open_api(db_url, tmp_path) as api:
        status, body = await api.get_json("/v1/greeks/snapshots", limit="50000")
    assert status == 200
    rows = body["rows"]
    assert len(rows) == stored > 1000
    assert {r["broker"] for r in rows} == {"ibkr", "tastytrade"}
    for row in rows:
        missing = [f for f in REQUIRED if row.get(f) in (None, "")]
        assert not missing, f"row without {missing}: {row}"
    keys_per_option: dict[tuple[str, str, str, str], set[str]] = {}
    brokers_per_key: dict[str, set[str]] = {}
    for r in rows:
        option = (r["underlying"], r["expiration"], str(r["strike"]), r["option_type"])
        keys_per_option.setdefault(option, set()).add(r["contract_key"])
        brokers_per_key.setdefault(r["contract_key"], set()).add(r["broker"])
    assert all(len(keys) == 1 for keys in keys_per_option.values()), keys_per_option
    assert all(b == {"ibkr", "tastytrade"} for b in brokers_per_key.values()), brokers_per_key
