"""Option symbols as the brokers' servers print them, for the simulators.

Written from the protocol notes (`dxlink.md` "Symbols"), not taken from the clients: a
simulator that borrowed the client's symbol code would agree with the client's mistakes.
"""

from __future__ import annotations

from decimal import Decimal

from greeksd.model import ContractKey, format_strike
from greeksd.sim.market import SimContract


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


# ---- futures options ----------------------------------------------------------------
# Shapes from real captures, not from the client:
# - Tastytrade symbol and dxFeed streamer symbol pairs: './ESU3 EW4N3 230728C3990' <->
#   './EW4N23C3990:XCME' and the future '/ESM3' <-> '/ESM23:XCME' (github.com/
#   laustindasauce/tasty-go option_chains_test.go, futures_test.go); './GCV5 OGV5
#   250925P2755' <-> './OGV25P2755:XCEC' (QuantConnect Lean.Brokerages.Tastytrade PR 12);
#   a live position './ZNH6 OZNG6 260123P111' <-> './OZNG26P111:XCBT', multiplier 1000,
#   and './MESM6EX3H6 260320P6450' (a five-letter future leaves no space).
# - The Tastytrade symbol is fixed width: './', the future padded to 5, the option
#   contract code padded to 5, ' ', YYMMDD, C|P, the strike without trailing zeros.
# - The option contract code is the product, the option's contract month and its year's
#   last digit; dxFeed writes the year in two digits and appends the exchange's MIC.
#   Equity index options are named for their expiry month (EW4N3 expires in July),
#   treasury and metal options for the month after it (OZNG6 expires 2026-01-23, OGV5
#   2025-09-25), crude options for their future's month (LOG6 is on CLG6).

_MIC = {"CME": "XCME", "CBOT": "XCBT", "NYMEX": "XNYM", "COMEX": "XCEC"}
_NAMED_FOR_NEXT_MONTH = frozenset({"OZN", "OG"})
_NAMED_FOR_THE_FUTURE = frozenset({"LO"})
_MONTHS = "FGHJKMNQUVXZ"


def tastytrade_future(future: str) -> str:
    """'ESZ26' -> '/ESZ6': Tastytrade writes the year in one digit."""
    return f"/{future[:-2]}{future[-1]}"


def dxfeed_future(future: str, exchange: str) -> str:
    """'ESZ26' on CME -> '/ESZ26:XCME'."""
    return f"/{future}:{_MIC[exchange]}"


def _contract_month(key: ContractKey) -> tuple[str, int]:
    """The option's contract month code and year."""
    if key.root in _NAMED_FOR_THE_FUTURE:
        return key.future[-3], 2000 + int(key.future[-2:])
    month = key.expiration.month - 1 + (1 if key.root in _NAMED_FOR_NEXT_MONTH else 0)
    return _MONTHS[month % 12], key.expiration.year + month // 12


def tastytrade_future_option(key: ContractKey) -> str:
    """'/ESZ26 EW3 2026-12-07 C 6025' -> './ESZ6 EW3Z6 261207C6025'."""
    month, year = _contract_month(key)
    code = f"{key.root}{month}{year % 10}"
    future = tastytrade_future(key.future)[1:]
    strike = format_strike(key.strike)
    return f"./{future:<5}{code:<5} {key.expiration:%y%m%d}{key.right.value}{strike}"


def dxfeed_future_option(key: ContractKey, exchange: str) -> str:
    """'/ESZ26 EW3 2026-12-07 C 6025' on CME -> './EW3Z26C6025:XCME'."""
    month, year = _contract_month(key)
    strike = format_strike(key.strike)
    return f"./{key.root}{month}{year % 100:02d}{key.right.value}{strike}:{_MIC[exchange]}"


def dxfeed_option(contract: SimContract) -> str:
    """The contract's DXLink symbol: its Greeks come under it."""
    if contract.key.future:
        return dxfeed_future_option(contract.key, contract.exchange)
    return streamer_symbol(contract.key)


def dxfeed_underlying(contract: SimContract) -> str:
    """The DXLink symbol of the contract's underlying: a future's for a futures option."""
    if contract.key.future:
        return dxfeed_future(contract.underlying, contract.exchange)
    return contract.underlying
