"""A deterministic synthetic options market: seeded underlying paths + Black-Scholes.

It is the data behind the synthetic source and both broker simulators, so a test can
recompute exactly what a simulator sent (same seed, same steps => same numbers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from greeksd.model import FUTURE_MONTHS, ContractKey, OptionRight

_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _norm_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / _SQRT_2PI


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True, slots=True)
class Greeks:
    """Black-Scholes values in the units brokers report: theta per day, vega and rho
    per 1 percentage point, implied volatility as a fraction."""

    price: float
    delta: float
    gamma: float
    theta: float
    vega: float
    rho: float
    implied_volatility: float


def black_scholes(
    spot: float, strike: float, years: float, rate: float, vol: float, right: OptionRight
) -> Greeks:
    years = max(years, 1.0 / 365.0 / 24.0)
    sqrt_t = math.sqrt(years)
    d1 = (math.log(spot / strike) + (rate + 0.5 * vol * vol) * years) / (vol * sqrt_t)
    d2 = d1 - vol * sqrt_t
    discount = math.exp(-rate * years)
    pdf_d1 = _norm_pdf(d1)
    gamma = pdf_d1 / (spot * vol * sqrt_t)
    vega = spot * pdf_d1 * sqrt_t / 100.0
    decay = -spot * pdf_d1 * vol / (2.0 * sqrt_t)
    if right is OptionRight.CALL:
        price = spot * _norm_cdf(d1) - strike * discount * _norm_cdf(d2)
        delta = _norm_cdf(d1)
        theta = (decay - rate * strike * discount * _norm_cdf(d2)) / 365.0
        rho = strike * years * discount * _norm_cdf(d2) / 100.0
    else:
        price = strike * discount * _norm_cdf(-d2) - spot * _norm_cdf(-d1)
        delta = _norm_cdf(d1) - 1.0
        theta = (decay + rate * strike * discount * _norm_cdf(-d2)) / 365.0
        rho = -strike * years * discount * _norm_cdf(-d2) / 100.0
    return Greeks(price, delta, gamma, theta, vega, rho, vol)


@dataclass(frozen=True, slots=True)
class SimContract:
    """A contract the simulated account holds. For a futures option `underlying` is the
    future's canonical code ('ESZ25', the key's `future`): its price is the one that moves,
    and each simulator prints it its own way ('/ESZ5', '/ESZ25:XCME', a conid)."""

    key: ContractKey
    underlying: str
    multiplier: Decimal
    quantity: Decimal
    exchange: str = ""


@dataclass(frozen=True, slots=True)
class Tick:
    """One Greeks update the market produced: `seq` counts ticks from 0."""

    seq: int
    contract: SimContract
    underlying_price: float
    greeks: Greeks
    bid: float
    ask: float


SPOTS: dict[str, float] = {"AAPL": 190.0, "SPY": 510.0, "SPX": 5100.0, "MSFT": 420.0, "QQQ": 440.0}

# Futures options held in the simulated book: (future root, option product, strike step,
# multiplier, exchange, the future's price, months between quarterly futures).
# The products and multipliers are CME's: ES options 50 (E-mini S&P, weekly Friday 'EW3'
# style codes), crude LO 1000 barrels, 10-year note OZN 1000 ($ per point).
FUTURES_OPTION_PRODUCTS: tuple[tuple[str, str, Decimal, Decimal, str, float, int], ...] = (
    ("ES", "EW3", Decimal(25), Decimal(50), "CME", 6000.0, 3),
    ("CL", "LO", Decimal("0.5"), Decimal(1000), "NYMEX", 62.0, 1),
    ("ZN", "OZN", Decimal("0.25"), Decimal(1000), "CBOT", 112.0, 3),
)


def futures_option_contracts(as_of: date, count: int = 3) -> list[SimContract]:
    """Futures options on ES, CL and ZN (round-robin), each on the first future whose
    delivery month is at least a month after `as_of`, expiring about three weeks before
    it; strikes near the future's price, with the products' fractional steps."""
    contracts: list[SimContract] = []
    for i in range(count):
        root, product, step, multiplier, exchange, price, cycle = FUTURES_OPTION_PRODUCTS[
            i % len(FUTURES_OPTION_PRODUCTS)
        ]
        months = as_of.year * 12 + as_of.month  # 1-based month count of as_of
        delivery = months + 1 + (-(months + 1 - 3) % cycle if cycle == 3 else 0)
        year, month = divmod(delivery - 1, 12)
        future = f"{root}{FUTURE_MONTHS[month]}{year % 100:02d}"
        expiry = max(date(year, month + 1, 1) - timedelta(days=21), as_of + timedelta(days=7))
        right = OptionRight.CALL if i % 2 == 0 else OptionRight.PUT
        strike = Decimal(str(price)) + step * (1 + i // len(FUTURES_OPTION_PRODUCTS)) * (
            1 if right is OptionRight.CALL else -1
        )
        quantity = Decimal(-1 if i % 3 == 1 else 2)
        key = ContractKey(product, expiry, right, strike, future)
        contracts.append(SimContract(key, future, multiplier, quantity, exchange))
    return contracts


def default_contracts(as_of: date, count: int = 8) -> list[SimContract]:
    """A varied book: calls and puts, long and short, monthlies and an SPXW weekly,
    a fractional strike; expirations relative to `as_of` so they never lie in the past.
    Strikes stay within ten steps of the spot whatever `count` is; further contracts
    move out in expiry, so every key is distinct."""
    roots = [("AAPL", "AAPL"), ("SPY", "SPY"), ("SPXW", "SPX"), ("MSFT", "MSFT"), ("QQQ", "QQQ")]
    contracts: list[SimContract] = []
    for i in range(count):
        root, underlying = roots[i % len(roots)]
        spot = SPOTS[underlying]
        step = 5.0 if spot < 1000 else 25.0
        offset = (i // len(roots)) % 10 + 1
        right = OptionRight.CALL if i % 2 == 0 else OptionRight.PUT
        direction = 1 if right is OptionRight.CALL else -1
        strike = Decimal(str(round(spot / step) * step + direction * offset * step))
        if i == 3:
            strike += Decimal("2.5")  # a fractional strike: 422.5 style
        expiry = as_of + timedelta(days=7 * (offset + i % 4 + 4 * (i // 50)))
        quantity = Decimal((i % 3) + 1) * (-1 if i % 4 == 1 else 1)
        contracts.append(
            SimContract(
                ContractKey(root, expiry, right, strike), underlying, Decimal(100), quantity
            )
        )
    if len({c.key for c in contracts}) != len(contracts):
        raise AssertionError("default_contracts produced a duplicate key")
    return contracts


def showcase_book(as_of: date) -> list[SimContract]:
    """The book `just demo` and the mixed fixture hold at both brokers: ten equity and
    index options (`default_contracts`) and three futures options (ES, CL, ZN)."""
    return default_contracts(as_of, 10) + futures_option_contracts(as_of, 3)


def initial_price(underlying: str) -> float:
    """Where an underlying's path starts: its spot, or its futures product's price for a
    future code ('ESZ26' starts where ES does)."""
    if underlying in SPOTS:
        return SPOTS[underlying]
    for root, _, _, _, _, price, _ in FUTURES_OPTION_PRODUCTS:
        if underlying[:-3] == root:
            return price
    return 100.0


class SyntheticMarket:
    """Geometric Brownian motion per underlying; each `next_tick` moves one underlying
    a small step and reprices one contract, round-robin, so every contract ticks."""

    def __init__(
        self,
        contracts: Sequence[SimContract],
        *,
        as_of: date,
        seed: int = 7,
        rate: float = 0.04,
        base_vol: float = 0.25,
    ) -> None:
        if not contracts:
            raise ValueError("a synthetic market needs at least one contract")
        self.contracts = list(contracts)
        self.as_of = as_of
        self._rng = random.Random(seed)
        self._rate = rate
        self._base_vol = base_vol
        self._spots = {c.underlying: initial_price(c.underlying) for c in self.contracts}
        self._seq = 0

    def spot(self, underlying: str) -> float:
        return self._spots[underlying]

    def add_contract(self, contract: SimContract) -> None:
        self._spots.setdefault(contract.underlying, initial_price(contract.underlying))
        self.contracts.append(contract)

    def remove_contract(self, key: ContractKey) -> None:
        self.contracts = [c for c in self.contracts if c.key != key]

    def next_tick(self) -> Tick:
        contract = self.contracts[self._seq % len(self.contracts)]
        spot = self._spots[contract.underlying]
        spot *= math.exp(0.0005 * self._rng.gauss(0.0, 1.0))
        self._spots[contract.underlying] = spot
        vol = self._base_vol * (1.0 + 0.05 * self._rng.gauss(0.0, 1.0))
        years = (contract.key.expiration - self.as_of).days / 365.0
        greeks = black_scholes(
            spot, float(contract.key.strike), years, self._rate, max(vol, 0.01), contract.key.right
        )
        half_spread = max(0.01, round(greeks.price * 0.01, 2))
        tick = Tick(
            self._seq,
            contract,
            spot,
            greeks,
            bid=round(max(greeks.price - half_spread, 0.0), 2),
            ask=round(greeks.price + half_spread, 2),
        )
        self._seq += 1
        return tick
