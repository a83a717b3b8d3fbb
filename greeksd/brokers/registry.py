"""The brokers greeksd knows: one line per broker package's spec.

Adding a broker is a new package exporting `SPEC` (see greeksd.brokers.spec) and one
line here; nothing else in greeksd names brokers. Order is the order of the README's
settings table, `greeksd sim --help` and the like.
"""

from __future__ import annotations

from typing import Any

from greeksd.brokers import synthetic
from greeksd.brokers.ibkr import spec as ibkr
from greeksd.brokers.spec import BrokerSpec
from greeksd.brokers.tastytrade import spec as tastytrade

SPECS: dict[str, BrokerSpec[Any]] = {
    spec.name: spec
    for spec in (
        ibkr.SPEC,
        tastytrade.SPEC,
        synthetic.SPEC,
    )
}


def specs() -> list[BrokerSpec[Any]]:
    """Every registered broker, in registry order."""
    return list(SPECS.values())


def names() -> tuple[str, ...]:
    return tuple(SPECS)


def get(name: str) -> BrokerSpec[Any] | None:
    return SPECS.get(name)
