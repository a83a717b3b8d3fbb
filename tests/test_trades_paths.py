"""Executions from both simulated brokers into `trades`, once each, over real sockets and a
real database: live (IBKR `str` topic), backfilled (IBKR /iserver/account/trades after a
reconnect), polled (Tastytrade transactions), and re-delivered without a second row."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import trio

from greeksd.backoff import Backoff
from greeksd.brokers.ibkr.stream import IbkrStream
from greeksd.brokers.tastytrade.connection import TastytradeCounters
from greeksd.brokers.tastytrade.session import TastytradeApi
from greeksd.brokers.tastytrade.stream import TastytradeStream
from greeksd.model import Broker, ContractKey, Source, StreamState, StreamStatus, Trade
from greeksd.pipeline import Pipeline, open_pipeline
from greeksd.sim.ibkr_gateway import IbkrGatewaySim, open_ibkr_sim
from greeksd.sim.market import SimContract, default_contracts
from greeksd.sim.tastytrade_api import open_tastytrade_sim
from greeksd.store.trade_writer import TradeWriter
from tests.helpers import fetch_rows, wait_until

ROW = (
    "SELECT broker, broker_trade_id, account_id, contract_key, symbol, side, quantity,"
    " price, executed_at, source FROM trades ORDER BY executed_at, broker_trade_id"
)


def ms(stamp: datetime) -> int:
    return (stamp - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@asynccontextmanager
async def streaming(db_url: str, source: Source) -> AsyncIterator[tuple[Pipeline, StreamStatus]]:
    """`source` into a real pipeline; leaving stops the source, then drains the pipeline."""
    status = StreamStatus(source.name)
    async with open_pipeline(db_url) as pipeline, trio.open_nursery() as nursery:
        nursery.start_soon(source.run, pipeline.sink, status)
        yield pipeline, status
        nursery.cancel_scope.cancel()


def trades_subscribed(sim: IbkrGatewaySim) -> int:
    return sum(text == "str+{}" for _, text in sim.received)


async def test_ibkr_executions_live_backfilled_and_redelivered_are_stored_once(
    db_url: str,
) -> None:
    book = default_contracts(datetime.now(UTC).date(), 4)
    closed = SimContract(
        ContractKey.parse("SPXW 2026-12-18 P 5812.5"), "SPX", Decimal(100), Decimal(0)
    )
    async with open_ibkr_sim(book, tick_interval=None) as sim:
        # executed while greeksd was not running: only the REST backfill can bring it
        early = sim.execute(book[0], "S", Decimal(2), Decimal("3.45"))
        stream = IbkrStream(
            sim.url, rest_min_interval=0.0, backoff=Backoff(initial=0.05, maximum=0.2)
        )
        async with streaming(db_url, stream) as (pipeline, status):
            writer = pipeline.trade_writer
            await wait_until(lambda: writer.stats.written == 1, what="backfilled execution")
            await wait_until(lambda: trades_subscribed(sim) == 1, what="str+{} sent")
            live = sim.execute(book[1], "B", Decimal(1), Decimal("12.05"))
            # an option no longer held: its key comes from secdef by conid
            gone = sim.execute(closed, "B", Decimal(3), Decimal("0.85"))
            await wait_until(lambda: writer.stats.written == 3, what="live executions")
            assert writer.stats.duplicates == 0

            sim.resend_execution(live)  # the gateway repeating a fill on `str`
            await wait_until(lambda: writer.stats.duplicates == 1, what="re-sent fill")
            sim.drop_connections()  # reconnect => /iserver/account/trades lists all three
            await wait_until(lambda: trades_subscribed(sim) == 2, what="re-subscribed")
            await wait_until(lambda: writer.stats.duplicates == 4, what="backfill after drop")
            assert status.reconnects >= 1 and status.state is StreamState.CONNECTED

            sim.resend_execution({"execution_id": "bad.1", "side": "X", "size": 1})
            await wait_until(
                lambda: status.counters.rejected_trades == 1, what="bad execution counted"
            )
    rows = fetch_rows(db_url, ROW)
    assert len(rows) == 3, "each execution stored once however often it was delivered"
    expected = [
        (early, book[0].key, "sell", Decimal(2), Decimal("3.45")),
        (live, book[1].key, "buy", Decimal(1), Decimal("12.05")),
        (gone, closed.key, "buy", Decimal(3), Decimal("0.85")),
    ]
    by_id = {row[1]: row for row in rows}
    for execution, key, side, quantity, price in expected:
        broker, _id, account, contract_key, symbol, s, q, p, executed_at, source = by_id[
            execution["execution_id"]
        ]
        assert (broker, account, contract_key, source) == ("ibkr", sim.account, str(key), "broker")
        assert (s, q, p) == (side, quantity, price)
        assert ms(executed_at) == execution["trade_time_r"]
        assert symbol == execution["symbol"]


async def test_tastytrade_fills_polled_again_are_stored_once(db_url: str) -> None:
    book = default_contracts(datetime.now(UTC).date(), 3)
    async with open_tastytrade_sim(contracts=book, tick_interval=0.05) as sim:
        opened = sim.execute(book[2], "Sell to Open", Decimal(3), Decimal("2.5"))
        api = TastytradeApi(sim.secret, sim.refresh_token, api_url=sim.api_url)
        stream = TastytradeStream(
            api, positions_refresh_s=0.1, backoff=Backoff(initial=0.05, maximum=0.2)
        )
        async with streaming(db_url, stream) as (pipeline, status):
            writer = pipeline.trade_writer
            await wait_until(lambda: writer.stats.written == 1, what="first poll")
            closed = sim.execute(book[0], "Buy to Close", Decimal(1), Decimal("0.75"))
            await wait_until(lambda: writer.stats.written == 2, what="new fill on a later poll")
            polls = sim.transaction_requests
            await wait_until(lambda: sim.transaction_requests >= polls + 2, what="two more polls")
            await wait_until(lambda: writer.stats.duplicates >= 4, what="re-polled fills")
    rows = fetch_rows(db_url, ROW)
    assert len(rows) == 2, "a fill polled many times is one row"
    assert isinstance(status.counters, TastytradeCounters)
    assert status.counters.rejected_trades == 0
    by_id = {row[1]: row for row in rows}
    for body, contract, side in ((opened, book[2], "sell"), (closed, book[0], "buy")):
        broker, _id, account, key, symbol, s, q, p, executed_at, source = by_id[str(body["id"])]
        assert (broker, account, key, symbol, source) == (
            "tastytrade",
            sim.account,
            str(contract.key),
            body["symbol"],
            "broker",
        )
        assert (s, q, p) == (side, Decimal(body["quantity"]), Decimal(body["price"]))
        assert executed_at == datetime.fromisoformat(body["executed-at"])


def trade(trade_id: str, quantity: Decimal) -> Trade:
    return Trade(
        Broker.IBKR,
        trade_id,
        "U1",
        "SPY 2026-12-18 C 512.5",
        "SPY",
        "buy",
        quantity,
        Decimal("1.5"),
        datetime(2026, 1, 5, 15, 30, tzinfo=UTC),
    )


async def test_trade_writer_sets_aside_a_refused_trade_and_keeps_its_neighbours(
    db_url: str,
) -> None:
    writer = TradeWriter(db_url)
    send, receive = trio.open_memory_channel[Trade](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        async with send:
            for item in (trade("a", Decimal(1)), trade("zero", Decimal(0)), trade("b", Decimal(2))):
                await send.send(item)
            await writer.wait_settled(3)
    assert (writer.stats.written, writer.stats.rejected) == (2, 1)
    assert [r[0] for r in fetch_rows(db_url, "SELECT broker_trade_id FROM trades ORDER BY 1")] == [
        "a",
        "b",
    ]


async def test_trade_writer_retries_until_the_database_is_reachable(db_url: str) -> None:
    attempts: list[str] = []

    def connect(url: str) -> psycopg.Connection:
        attempts.append(url)
        if len(attempts) < 3:  # a real refused connection, twice
            return psycopg.connect("postgresql://127.0.0.1:1/none", connect_timeout=1)
        return psycopg.connect(url, autocommit=True)

    writer = TradeWriter(db_url, backoff=Backoff(initial=0.01, maximum=0.02), connect=connect)
    send, receive = trio.open_memory_channel[Trade](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        async with send:
            await send.send(trade("r", Decimal(1)))
            await writer.wait_settled(1)
            assert writer.stats.state is StreamState.CONNECTED
    assert (writer.stats.failed_attempts, writer.stats.written) == (2, 1)
    assert fetch_rows(db_url, "SELECT broker_trade_id FROM trades") == [("r",)]
