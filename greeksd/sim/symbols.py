"""Option symbols as the brokers' servers print them, for the simulators.

Written from the protocol notes (`dxlink.md` "Symbols"), not taken from the clients: a
simulator that borrowed the client's symbol code would agree with the client's mistakes.
"""

from __future__ import annotations

from decimal import Decimal

from greeksd.model import ContractKey, format_strike


def streamer_symbol(key: ContractKey) -> str:
    """dxFeed's equity option symbol: `.` + root + YYMMDD + C|P + strike without trailing
    zeros (`.AAPL250620C190`, `.SPY250620C512.5`)."""
    return f".{key.root}{key.expiration:%y%m%d}{key.right.value}{format_strike(key.strike)}"


def occ_symbol(key: ContractKey) -> str:
    """The OCC symbol: root padded to 6, YYMMDD, C|P, strike x 1000 in 8 digits
    (`AAPL  250620C00190000`). Tastytrade's `symbol`, IBKR's local symbol."""
    milli = key.strike * 1000
    if milli != milli.to_integral_value() or not 0 < milli < Decimal(10**8) or len(key.root) > 6:
        raise ValueError(f"{key} has no OCC symbol")
    return f"{key.root:<6}{key.expiration:%y%m%d}{key.right.value}{int(milli):08d}"
