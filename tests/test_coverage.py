"""The coverage tracker and the Connections that feed it, by plain calls (no I/O)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from greeksd.brokers.ibkr import protocol as p
from greeksd.brokers.ibkr.connection import IbkrConnection
from greeksd.brokers.ibkr.protocol import OptionPosition, PositionScan
from greeksd.coverage import Coverage
from greeksd.model import Contract, ContractKey, OptionRight

T0 = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)


def contract(strike: int, account: str = "U1") -> Contract:
    key = ContractKey("AAPL", date(2025, 6, 20), OptionRight.CALL, Decimal(strike))
    return Contract(key, "AAPL", Decimal(100), Decimal(1), account)


def tracker(count: int = 3, stale_s: float = 10.0) -> Coverage:
    coverage = Coverage("ibkr", stale_s)
    coverage.track((i, contract(100 + i)) for i in range(count))
    return coverage


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_states_partition_the_subscribed_contracts() -> None:
    coverage = tracker(4)
    coverage.update(0, at(0), greeks=True, price=True)  # fresh at 5, stale at 11
    coverage.update(1, at(4), greeks=True, price=False)
    coverage.update(2, at(4), greeks=True, price=True)
    coverage.quality(2, "delayed")
    # 3: never
    assert coverage.summary(at(5)) == {
        "subscribed": 4,
        "fresh": 2,
        "stale": 0,
        "never": 1,
        "delayed": 1,
        "stale_s": 10.0,
    }
    summary = coverage.summary(at(11))
    assert (summary["fresh"], summary["stale"], summary["never"], summary["delayed"]) == (
        1,
        1,
        1,
        1,
    )


def test_a_price_only_update_does_not_make_greeks_fresh() -> None:
    coverage = tracker(1)
    coverage.update(0, at(0), greeks=True, price=True)
    coverage.update(0, at(20), greeks=False, price=True)
    (entry,) = coverage.entries()
    assert (entry.last_greeks_at, entry.last_price_at) == (at(0), at(20))
    assert entry.state(at(20), 10.0) == "stale"


def test_zero_stale_s_disables_staleness_and_degradation() -> None:
    coverage = tracker(2, stale_s=0)
    coverage.update(0, at(0), greeks=True, price=True)
    assert coverage.summary(at(10_000))["fresh"] == 1
    assert coverage.summary(at(10_000))["never"] == 1
    assert not coverage.assess(at(10_000), at(0), at(10_000)).degraded


def test_retracking_keeps_what_was_received_and_drops_what_is_gone() -> None:
    coverage = tracker(2)
    coverage.update(0, at(0), greeks=True, price=True)
    coverage.track([(7, contract(100)), (8, contract(200))])  # new handles, same contract 100
    assert [(e.contract_key[-3:], e.last_greeks_at) for e in coverage.entries()] == [
        ("100", at(0)),
        ("200", None),
    ]


def test_no_degradation_before_the_link_was_up_for_stale_s() -> None:
    coverage = tracker(3)
    assert not coverage.assess(at(9), at(0), at(9)).degraded
    verdict = coverage.assess(at(10), at(0), at(10))
    assert verdict.degraded
    assert verdict.reason == "link alive, no Greeks: no data for 3 of 3 contracts"


def test_link_silent_is_told_apart_from_link_alive() -> None:
    coverage = tracker(3)
    verdict = coverage.assess(at(30), at(0), at(5))
    assert verdict.reason == "link silent: no data for 3 of 3 contracts"


def test_prices_without_greeks_and_delayed_only_are_named() -> None:
    coverage = tracker(2)
    coverage.update(0, at(20), greeks=False, price=True)
    coverage.update(1, at(20), greeks=False, price=True)
    assert coverage.assess(at(21), at(0), at(21)).reason == (
        "link alive, no Greeks: prices but no Greeks for 2 of 2 contracts"
    )
    for handle in (0, 1):
        coverage.update(handle, at(21), greeks=True, price=True)
        coverage.quality(handle, "frozen")
    assert coverage.assess(at(22), at(0), at(22)).reason == (
        "link alive, no Greeks: delayed data only"
    )


def test_partial_coverage_is_named_but_does_not_degrade() -> None:
    coverage = tracker(3)
    coverage.left_out = 12
    coverage.update(0, at(15), greeks=True, price=True)
    verdict = coverage.assess(at(20), at(0), at(20))
    assert not verdict.degraded
    assert verdict.reason == "no data for 2 of 3 contracts; line limit: 12 left out"


def test_ibkr_connection_feeds_what_each_smd_update_carried() -> None:
    option = OptionPosition(11, 265598, contract(190))
    conn = IbkrConnection("s", PositionScan([option], []))
    conn.coverage.stale_s = 10.0
    conn.start(0.0, at(0))

    def smd(fields: dict[str, str], seconds: float) -> None:
        frame = '{"topic":"smd+11","conid":11,' + ",".join(
            f'"{k}":"{v}"' for k, v in fields.items()
        )
        conn.receive(frame + "}", seconds, at(seconds))

    smd({p.LAST: "1.5", p.DELTA: "0.5"}, 1)
    smd({p.BID: "1.4"}, 5)  # the merged row still has a delta: not fresh Greeks
    smd({p.AVAILABILITY: "DpB"}, 6)
    (entry,) = conn.coverage.entries()
    assert (entry.last_greeks_at, entry.last_price_at, entry.market_data) == (
        at(1),
        at(5),
        "delayed",
    )
    assert conn.coverage.data == "smd data"
