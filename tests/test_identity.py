"""One option, one contract_key, whichever broker reports it.

The table feeds real-world-shaped inputs to the real broker parsers (IBKR positions and
secdef; Tastytrade OCC and streamer symbols) and demands the identical ContractKey; the
end-to-end test runs both simulators on the same book into one database.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from greeksd.brokers.ibkr import protocol as ib
from greeksd.brokers.tastytrade import protocol as dx
from greeksd.model import Contract, ContractKey, OptionRight, StreamStatus
from greeksd.sim.ibkr_gateway import open_ibkr_sim
from greeksd.sim.market import default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from tests.helpers import fetch_rows
from tests.streaming import ibkr_stream, stream_until, tastytrade_stream


def ibkr_position(desc: str, **fields: Any) -> dict[str, Any]:
    """A /portfolio/{acct}/positions entry as the gateway sends it (strike a string)."""
    return {
        "acctId": "U1234567",
        "conid": 700000001,
        "contractDesc": desc,
        "position": -1.0,
        "mktPrice": 12.5,
        "currency": "USD",
        "assetClass": "OPT",
        "multiplier": 100.0,
        "undConid": 416904,
        **fields,
    }


# (case, IBKR position (secdef merged in as the gateway client does), OCC, streamer, key)
CASES: list[tuple[str, dict[str, Any], str, str, str]] = [
    (
        "spxw weekly (index, weekly root)",
        ibkr_position(
            "SPXW   DEC2026 5800 P [SPXW  261218P05800000 100]",
            putOrCall="P",
            strike="5800",
            expiry="20261218",
            undSym="SPX",
            ticker="SPX",
        ),
        "SPXW  261218P05800000",
        ".SPXW261218P5800",
        "SPXW 2026-12-18 P 5800",
    ),
    (
        "spx AM monthly: IBKR expiry is the last trading day, OCC date wins",
        ibkr_position(
            "SPX    DEC2026 5800 C [SPX   261218C05800000 100]",
            putOrCall="C",
            strike="5800",
            expiry="20261217",
            undSym="SPX",
            ticker="SPX",
        ),
        "SPX   261218C05800000",
        ".SPX261218C5800",
        "SPX 2026-12-18 C 5800",
    ),
    (
        "fractional strike",
        ibkr_position(
            "SPY    DEC2026 512.5 C [SPY   261218C00512500 100]",
            putOrCall="C",
            strike="512.5",
            expiry="20261218",
            undSym="SPY",
            ticker="SPY",
        ),
        "SPY   261218C00512500",
        ".SPY261218C512.5",
        "SPY 2026-12-18 C 512.5",
    ),
    (
        "adjusted root with a digit",
        ibkr_position(
            "BRK B  JAN2027 400 C [BRKB1 270115C00400000 100]",
            putOrCall="C",
            strike="400",
            expiry="20270115",
            undSym="BRK B",
            ticker="BRK B",
        ),
        "BRKB1 270115C00400000",
        ".BRKB1270115C400",
        "BRKB1 2027-01-15 C 400",
    ),
    (
        "bare position + secdef tradingClass (weekly root, strike string)",
        {
            **ibkr_position("SPX", undSym="SPX", ticker="SPX"),
            "tradingClass": "SPXW",
            "strike": "5812.5",
            "expiry": "20260116",
            "putOrCall": "P",
        },
        "SPXW  260116P05812500",
        ".SPXW260116P5812.5",
        "SPXW 2026-01-16 P 5812.5",
    ),
    (
        "secdef strike with trailing zeros",
        {
            **ibkr_position("AAPL", undSym="AAPL", ticker="AAPL"),
            "tradingClass": "AAPL",
            "strike": "190.00",
            "expiry": "20260619",
            "putOrCall": "CALL",
        },
        "AAPL  260619C00190000",
        ".AAPL260619C190",
        "AAPL 2026-06-19 C 190",
    ),
    (
        "weekly equity option, quarter strike",
        ibkr_position(
            "QQQ    MAR2026 441.25 P [QQQ   260306P00441250 100]",
            putOrCall="P",
            strike="441.25",
            expiry="20260306",
            undSym="QQQ",
            ticker="QQQ",
        ),
        "QQQ   260306P00441250",
        ".QQQ260306P441.25",
        "QQQ 2026-03-06 P 441.25",
    ),
]


@pytest.mark.parametrize(
    ("position", "occ", "streamer", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_both_brokers_parse_the_same_option_to_one_key(
    position: dict[str, Any], occ: str, streamer: str, text: str
) -> None:
    from_ibkr = ib.parse_option_position(position, "U1234567").contract.key
    from_occ = dx.parse_occ(occ)
    from_streamer = dx.parse_streamer_symbol(streamer)
    assert from_ibkr == from_occ == from_streamer == ContractKey.parse(text)
    # identical field by field (same Decimal, not merely equal ones), hence same str/hash
    assert repr(from_ibkr) == repr(from_occ) == repr(from_streamer)
    assert str(from_ibkr) == str(from_occ) == str(from_streamer) == text
    assert len({from_ibkr, from_occ, from_streamer}) == 1
    assert dx.occ_symbol(from_ibkr) == occ and dx.streamer_symbol(from_ibkr) == streamer


def test_strike_spellings_make_one_key() -> None:
    keys = {
        repr(ContractKey("SPY", date(2026, 12, 18), OptionRight.CALL, Decimal(text)))
        for text in ("512.5", "512.50", "512.500", "5.125E+2")
    }
    assert len(keys) == 1
    with pytest.raises(ValueError):
        ContractKey("SPY", date(2026, 12, 18), OptionRight.CALL, Decimal(0))


def test_contract_renders_its_key_once() -> None:
    key = ContractKey.parse("SPY 2026-12-18 C 512.5")
    contract = Contract(key, "SPY", Decimal(100), Decimal(-2), "U1")
    assert contract.key_text == "SPY 2026-12-18 C 512.5"
    assert contract == Contract(key, "SPY", Decimal(100), Decimal(-2), "U1")


# Tastytrade futures options as the API prints them: position `symbol`, the instrument's
# `streamer-symbol`, its future's `streamer-symbol` -> the key and exchange. Sources:
# - ES EW3: the DXLink protocol notes and issue 17 ('./ESU4 EW3N4 240719C4400').
# - ES EW4: tasty-go option_chains_test.go, futures_test.go (github.com/laustindasauce/
#   tasty-go); ES E3A: Tastytrade's nested futures option chain docs
#   (developer.tastytrade.com, GET /futures-option-chains/{code}/nested).
# - ES E2C: a public "Tastytrade Futures Options Research" note (its chain item reports
#   option-root-symbol 'E2CF'; the symbol's contract code E2CF6 is E2C + F + 6, and the key
#   takes the product from the code, as IBKR's trading class is the same CME code).
# - GC OG and ZB OZB: QuantConnect Lean.Brokerages.Tastytrade PR 12 (two spaces after a
#   four-letter code); ZN OZN: a live positions response quoted in a public research note
#   (multiplier 1000); MES EX3: a public test factory (a five-letter future: no space).
#   The last two come from the search index without a repository name.
FUTURE_OPTIONS = [
    (
        "./ESU4 EW3N4 240719C4400",
        "./EW3N24C4400:XCME",
        "/ESU24:XCME",
        "/ESU24 EW3 2024-07-19 C 4400",
        "CME",
    ),
    (
        "./ESU3 EW4N3 230728C3990",
        "./EW4N23C3990:XCME",
        "/ESU23:XCME",
        "/ESU23 EW4 2023-07-28 C 3990",
        "CME",
    ),
    (
        "./ESU3 E3AN3 230717C5600",
        "./E3AN23C5600:XCME",
        "/ESU23:XCME",
        "/ESU23 E3A 2023-07-17 C 5600",
        "CME",
    ),
    (
        "./ESH6 E2CF6 260114P5990",
        "./E2CF26P5990:XCME",
        "/ESH26:XCME",
        "/ESH26 E2C 2026-01-14 P 5990",
        "CME",
    ),
    (
        "./GCV5 OGV5  250925P2755",
        "./OGV25P2755:XCEC",
        "/GCV25:XCEC",
        "/GCV25 OG 2025-09-25 P 2755",
        "COMEX",
    ),
    (
        "./ZNH6 OZNG6 260123P111",
        "./OZNG26P111:XCBT",
        "/ZNH26:XCBT",
        "/ZNH26 OZN 2026-01-23 P 111",
        "CBOT",
    ),
    (
        "./MESM6EX3H6 260320P6450",
        "./EX3H26P6450:XCME",
        "/MESM26:XCME",
        "/MESM26 EX3 2026-03-20 P 6450",
        "CME",
    ),
    (
        "./ZBU5 OZBN5 250620C142.5",
        "./OZBN25C142.5:XCBT",
        "/ZBU25:XCBT",
        "/ZBU25 OZB 2025-06-20 C 142.5",
        "CBOT",
    ),
]


@pytest.mark.parametrize(
    ("symbol", "streamer", "future", "key", "exchange"),
    FUTURE_OPTIONS,
    ids=[row[0] for row in FUTURE_OPTIONS],
)
def test_tastytrade_futures_options_map_to_one_key_and_their_feed(
    symbol: str, streamer: str, future: str, key: str, exchange: str
) -> None:
    parsed = dx.parse_future_option_symbol(symbol)
    assert str(parsed) == key and parsed == ContractKey.parse(key)
    feed, venue = dx.future_option_feed(parsed, streamer, future)
    assert (feed, venue) == (dx.FeedSymbols(streamer, future), exchange)


@pytest.mark.parametrize(
    ("streamer", "future", "reason"),
    [
        ("./EW3N24C4450:XCME", "/ESU24:XCME", "does not match the position"),  # strike
        ("./EW3N24P4400:XCME", "/ESU24:XCME", "does not match the position"),  # right
        ("./EW4N24C4400:XCME", "/ESU24:XCME", "does not match the position"),  # product
        ("./EW3N24C4400:XCME", "/ESZ24:XCME", "future streamer symbol does not match"),
        (".ES240719C4400", "/ESU24:XCME", "streamer symbol not understood"),
        ("./EW3N24C4400:XCME", "ES", "future streamer symbol not understood"),
    ],
)
def test_a_futures_option_feed_that_disagrees_with_the_position_is_refused(
    streamer: str, future: str, reason: str
) -> None:
    key = dx.parse_future_option_symbol("./ESU4 EW3N4 240719C4400")
    with pytest.raises(dx.Unsupported, match=reason):
        dx.future_option_feed(key, streamer, future)


@pytest.mark.parametrize(
    "symbol",
    [
        "./ESU4 EW3N4 241319C4400",  # month 13
        "./ESU4 EW3N4 240719X4400",  # right
        "./ESU4 EW3N4 240719C0",  # strike
        "./ES U4EW3N4 240719C4400",  # a space inside the future
        "./ESU4 EW3NN 240719C4400",  # no year digit on the contract code
        "./ESU4 EW3N4240719C4400",  # no space before the date
        "ESU4 EW3N4 240719C4400",
        "AAPL  250620C00190000",
    ],
)
def test_malformed_futures_option_symbols_are_refused(symbol: str) -> None:
    with pytest.raises(dx.SymbolError):
        dx.parse_future_option_symbol(symbol)


# ---- IBKR futures options: captured positions + secdef + the future's contract info --------
# The positions are real (tests/fixtures/real/ibkr/fop-positions.json, provenance there): a
# FOP names its trading class only in `contractDesc` and sends strike 0.0, undConid 0 and
# nulls for the rest. The secdef rows carry /trsrv/secdef's fields (the OpenAPI example's
# shape) and the futures' info /iserver/contract/{conid}/info's (`local_symbol`,
# `contract_month`), with the values these contracts have: E2D/EW2 are June 2025 weeklies
# on ESM5; ZN2 is a June weekly on the September note future, ZNU5.
_CAPTURED = json.loads(
    (Path(__file__).parent / "fixtures/real/ibkr/fop-positions.json").read_text()
)
_POSITIONS = {str(p["position_json"]["conid"]): p for p in _CAPTURED["positions"]}
ESM5, ZNU5 = 495512563, 568550526
FUTURES: dict[int, dict[str, Any]] = {
    ESM5: {"con_id": ESM5, "symbol": "ES", "local_symbol": "ESM5", "contract_month": "202506"},
    ZNU5: {
        "con_id": ZNU5,
        "symbol": "ZN",
        "local_symbol": "ZN   SEP 25",
        "contract_month": "202509",
    },
}


def trsrv_secdef(
    conid: str, expiry: str, right: str, strike: str, mult: float, und: int
) -> dict[str, Any]:
    return {
        "conid": int(conid),
        "assetClass": "FOP",
        "ticker": "ES" if und == ESM5 else "ZN",
        "listingExchange": "CME" if und == ESM5 else "CBOT",
        "expiry": expiry,
        "lastTradingDay": expiry,
        "putOrCall": right,
        "strike": strike,
        "multiplier": mult,
        "undConid": und,
    }


@pytest.mark.parametrize(
    ("conid", "secdef", "text", "multiplier", "exchange"),
    [
        (
            "784136636",
            trsrv_secdef("784136636", "20250612", "C", "6040", 50.0, ESM5),
            "/ESM25 E2D 2025-06-12 C 6040",
            Decimal(50),
            "CME",
        ),
        (
            "784391272",
            trsrv_secdef("784391272", "20250613", "C", "6010", 50.0, ESM5),
            "/ESM25 EW2 2025-06-13 C 6010",
            Decimal(50),
            "CME",
        ),
        (  # the old-style local symbol: the contract month names the future
            "785625295",
            trsrv_secdef("785625295", "20250613", "C", "112.75", 1000.0, ZNU5),
            "/ZNU25 ZN2 2025-06-13 C 112.75",
            Decimal(1000),
            "CBOT",
        ),
    ],
)
def test_ibkr_captured_futures_option_positions_map_to_one_key(
    conid: str, secdef: dict[str, Any], text: str, multiplier: Decimal, exchange: str
) -> None:
    captured = _POSITIONS[conid]
    position = captured["position_json"]
    assert ib.is_future_option(position) and not ib.is_option(position)
    assert set(ib.missing_future_option_fields(position)) == {
        "undConid",
        "putOrCall",
        "strike",
        "multiplier",
        "expiry",
    }
    merged = ib.overlay(secdef, position)
    option = ib.parse_future_option_position(merged, "U1", FUTURES)
    key = option.contract.key
    assert str(key) == text and key == ContractKey.parse(text)
    assert repr(key) == repr(ContractKey.parse(text))  # identical field by field
    assert key.expiration.isoformat() == captured["expected_expiration"]
    assert option.und_conid == secdef["undConid"] and option.conid == int(conid)
    contract = option.contract
    assert (contract.underlying, contract.multiplier, contract.exchange) == (
        key.future[:2],
        multiplier,
        exchange,
    )
    assert contract.quantity == Decimal(-1) and contract.account_id == "U*******"


def test_ibkr_captured_option_position_with_zeros_takes_its_secdef_underlying() -> None:
    """The same capture's OPT entry also sends undConid 0: the secdef's conid is used, not
    a line for conid 0."""
    position = _POSITIONS["767939135"]["position_json"]
    secdef = {"conid": 767939135, "undConid": 12345, "multiplier": 100.0, "ticker": "SPXU"}
    option = ib.parse_option_position(ib.overlay(secdef, position), "U1")
    assert str(option.contract.key) == "SPXU 2025-06-20 C 40" and option.und_conid == 12345


def test_ibkr_futures_option_on_a_future_the_gateway_does_not_name_is_unsupported() -> None:
    position = _POSITIONS["784136636"]["position_json"]
    with pytest.raises(ib.UnsupportedPosition, match="784136636: the gateway names no future"):
        ib.parse_future_option_position(ib.overlay({}, position), "U1", FUTURES)
    secdef = trsrv_secdef("784136636", "20250612", "C", "6040", 50.0, 999)
    with pytest.raises(ib.UnsupportedPosition):
        ib.parse_future_option_position(ib.overlay(secdef, position), "U1", FUTURES)


@pytest.mark.parametrize(
    ("local", "month", "expiry", "future"),
    [
        ("ESZ5", "202512", date(2025, 12, 19), "ESZ25"),
        ("CLF6", "202601", date(2025, 12, 16), "CLF26"),  # options expire the year before
        ("ZN   DEC 25", "202512", date(2025, 11, 21), "ZNZ25"),
        ("", "202603", date(2026, 2, 20), "ESH26"),
    ],
)
def test_ibkr_future_code_from_contract_info(
    local: str, month: str, expiry: date, future: str
) -> None:
    info = {"symbol": future[:2], "local_symbol": local, "contract_month": month}
    assert ib.future_code(info, expiry) == future


async def test_both_simulators_one_book_one_key_per_option(db_url: str) -> None:
    book = default_contracts(datetime.now(UTC).date(), 10)
    ibkr_status, tt_status = StreamStatus("ibkr"), StreamStatus("tastytrade")
    async with (
        open_ibkr_sim(book, tick_interval=0.01) as ib_sim,
        open_tastytrade_sim(contracts=book, tick_interval=0.01) as tt_sim,
    ):

        def both_cover_the_book() -> bool:
            rows = fetch_rows(
                db_url,
                "SELECT contract_key, count(DISTINCT broker) FROM greek_snapshots GROUP BY 1",
            )
            return len(rows) >= len(book) and all(n == 2 for _, n in rows)

        await stream_until(
            db_url,
            [(ibkr_stream(ib_sim), ibkr_status), (tastytrade_stream(tt_sim), tt_status)],
            both_cover_the_book,
            what="both brokers on every key",
            timeout=20,
        )
    rows = fetch_rows(
        db_url,
        "SELECT contract_key, count(DISTINCT broker), array_agg(DISTINCT strike::text),"
        " array_agg(DISTINCT expiration) FROM greek_snapshots GROUP BY 1",
    )
    assert {key for key, *_ in rows} == {str(c.key) for c in book}
    for key, brokers, strikes, expirations in rows:
        parsed = ContractKey.parse(key)
        assert brokers == 2, key
        assert [Decimal(s) for s in strikes] == [parsed.strike], key
        assert expirations == [parsed.expiration], key
