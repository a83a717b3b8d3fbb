"""The API's queries use the indexes: partition pruning on time ranges and the contract
index on contract filters, shown by EXPLAIN on realistic data (ANALYZEd, planner
settings untouched)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from greeksd.store.partitions import create_partition, partition_name
from greeksd.store.queries import SNAPSHOTS, Filter, latest_query, page_queries, risk_rows_query

DAYS = [date(2026, 11, 24) + timedelta(days=i) for i in range(3)]
ROWS_PER_DAY = 40_000
CONTRACTS = 80


def _fill(conn: psycopg.Connection) -> None:
    for day in DAYS:
        create_partition(conn, day)
    conn.execute(
        """
        INSERT INTO greek_snapshots (broker, account_id, contract_key, underlying, expiration,
            strike, option_type, multiplier, quantity, delta, gamma, theta, vega,
            event_time, received_at, persisted_at, fingerprint)
        SELECT CASE WHEN c %% 2 = 0 THEN 'ibkr' ELSE 'tastytrade' END,
               'ACCT' || (c %% 4),
               'SPY 2026-12-18 C ' || (500 + c),
               'SPY', date '2026-12-18', 500 + c, 'C', 100, 1 + c %% 3,
               0.5, 0.01, -0.1, 0.2,
               %(start)s + (n * interval '1 second') * 86400 / %(per_day)s,
               now(), now(), n
        FROM generate_series(0, %(total)s - 1) AS n, LATERAL (SELECT n %% %(contracts)s AS c) k
        """,
        {
            "start": datetime.combine(DAYS[0], datetime.min.time(), UTC),
            "per_day": ROWS_PER_DAY,
            "total": ROWS_PER_DAY * len(DAYS),
            "contracts": CONTRACTS,
        },
    )
    conn.execute("ANALYZE greek_snapshots")


def _plan(conn: psycopg.Connection, query: tuple[sql.Composed, list[Any]]) -> str:
    composed, params = query
    rows = conn.execute(sql.SQL("EXPLAIN ") + composed, params).fetchall()
    return "\n".join(r[0] for r in rows)


def _contract_index(conn: psycopg.Connection, day: date) -> str:
    row = conn.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexdef LIKE %s",
        (partition_name(day), "%contract_key, event_time DESC, fingerprint%"),
    ).fetchone()
    assert row is not None
    return str(row[0])


def test_time_ranges_prune_partitions_and_contract_filters_use_the_index(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _fill(conn)
        middle = datetime.combine(DAYS[1], datetime.min.time(), UTC)
        window = Filter(start=middle + timedelta(hours=10), end=middle + timedelta(hours=12))
        others = [partition_name(DAYS[0]), partition_name(DAYS[2]), "greek_snapshots_default"]

        rows, boundary = page_queries(SNAPSHOTS, window, None, 1000)
        for plan in (_plan(conn, rows), _plan(conn, boundary)):
            assert partition_name(DAYS[1]) in plan, plan
            assert not any(name in plan for name in others), plan
            assert "Seq Scan" not in plan, plan

        # A later page: the cursor's time bound keeps the pruning.
        after = (middle + timedelta(hours=11), "ibkr", "ACCT0", "SPY 2026-12-18 C 500", 7)
        plan = _plan(conn, page_queries(SNAPSHOTS, window, after, 1000)[0])
        assert partition_name(DAYS[1]) in plan and not any(n in plan for n in others), plan

        contract = Filter(
            broker="ibkr",
            account_id="ACCT2",
            contract_key="SPY 2026-12-18 C 502",
            start=middle,
            end=middle + timedelta(days=1),
        )
        index = _contract_index(conn, DAYS[1])
        for query in (
            page_queries(SNAPSHOTS, contract, None, 1000)[0],
            latest_query(contract),
            risk_rows_query(contract, 60),
        ):
            plan = _plan(conn, query)
            assert (
                f"Index Scan using {index}" in plan
                or f"Index Only Scan using {index}" in plan
                or f"Bitmap Index Scan on {index}" in plan
            ), plan
            assert not any(name in plan for name in others), plan

        # Without a time range every partition is read, through the contract index.
        plan = _plan(conn, latest_query(replace_time(contract)))
        for day in DAYS:
            assert _contract_index(conn, day) in plan, plan


def replace_time(f: Filter) -> Filter:
    return Filter(broker=f.broker, account_id=f.account_id, contract_key=f.contract_key)
