"""The canonical identity of a futures option: its text form, its future code, its parse.

Brokers spell the same future three ways (Tastytrade '/ESZ5', IBKR 'ESZ5', dxFeed
'/ESZ25:XCME'); the key must come out identical from each, and never collide with an
equity option's key.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from greeksd.model import ContractKey, OptionRight, canonical_future, future_root


@pytest.mark.parametrize(
    ("symbol", "not_before", "expected"),
    [
        ("/ESZ5", date(2025, 12, 19), "ESZ25"),  # Tastytrade position / underlying-symbol
        ("ESZ5", date(2025, 12, 19), "ESZ25"),  # IBKR local symbol
        ("/ESZ25:XCME", date(2025, 12, 19), "ESZ25"),  # dxFeed streamer symbol
        ("ESZ2025", date(2025, 12, 19), "ESZ25"),
        ("/ESH6", date(2026, 1, 14), "ESH26"),  # ./ESH6 E2CF6 260114P5990
        ("/CLF6", date(2025, 12, 16), "CLF26"),  # January crude's options expire in December
        ("/ZNH6", date(2026, 2, 20), "ZNH26"),
        ("/MNQZ5", date(2025, 11, 21), "MNQZ25"),  # root with a month letter inside
        ("/6EZ5", date(2025, 11, 21), "6EZ25"),  # root starting with a digit
        ("/ESZ9", date(2025, 12, 19), "ESZ29"),  # a digit below the option's year: next decade
    ],
)
def test_every_spelling_of_a_future_gives_one_code(
    symbol: str, not_before: date, expected: str
) -> None:
    assert canonical_future(symbol, not_before) == expected


@pytest.mark.parametrize("symbol", ["ES", "/ES", "ESA5", "/ESZ", "ESZ123", "./ESZ5", "es z5"])
def test_a_symbol_that_is_not_a_future_is_refused(symbol: str) -> None:
    with pytest.raises(ValueError, match="futures contract"):
        canonical_future(symbol, date(2025, 1, 1))


def test_futures_option_key_text_round_trips_and_differs_from_an_equity_key() -> None:
    key = ContractKey("EW3", date(2025, 12, 19), OptionRight.CALL, Decimal("6000.0"), "ESZ25")
    assert str(key) == "/ESZ25 EW3 2025-12-19 C 6000"
    assert ContractKey.parse(str(key)) == key
    assert key.is_future_option and future_root(key.future) == "ES"
    equity = ContractKey("EW3", date(2025, 12, 19), OptionRight.CALL, Decimal(6000))
    assert equity != key and str(equity) == "EW3 2025-12-19 C 6000"
    assert not equity.is_future_option
    assert sorted([key, equity]) == [equity, key]  # keys stay orderable


@pytest.mark.parametrize(
    "text",
    [
        "/ESZ5 EW3 2025-12-19 C 6000",  # one-digit year is not canonical
        "/ES EW3 2025-12-19 C 6000",
        "ESZ25 EW3 2025-12-19 C 6000",  # five parts without the '/'
        "/ESZ25 EW3 2025-12-19 C",
        "/ESZ25 ew3 2025-12-19 C 6000",
    ],
)
def test_a_bad_futures_option_key_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ContractKey.parse(text)
