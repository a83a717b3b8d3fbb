"""Build model objects for tests with sensible, distinct values."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from greeksd.model import Broker, Contract, ContractKey, OptionRight, Snapshot

BASE_TIME = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)


def make_contract(
    root: str = "AAPL",
    strike: str = "190",
    right: OptionRight = OptionRight.CALL,
    expiration: date = date(2026, 12, 18),
    account: str = "U1234567",
    quantity: str = "2",
) -> Contract:
    return Contract(
        ContractKey(root, expiration, right, Decimal(strike)),
        root,
        Decimal(100),
        Decimal(quantity),
        account,
    )


def make_snapshot(i: int = 0, broker: Broker = Broker.SYNTHETIC, **overrides: Any) -> Snapshot:
    snapshot = Snapshot.for_contract(
        broker,
        make_contract(strike=str(180 + i % 5 * 5)),
        event_time=BASE_TIME + timedelta(milliseconds=i),
        received_at=datetime.now(UTC),
        delta=0.5 + i * 1e-6,
        gamma=0.03,
        theta=-0.08,
        vega=0.21,
        rho=0.04,
        implied_volatility=0.27,
        underlying_price=191.25,
        bid=5.3,
        ask=5.4,
        last=5.35,
        mark=5.35,
        source_payload={"seq": i},
    )
    return replace(snapshot, **overrides) if overrides else snapshot
