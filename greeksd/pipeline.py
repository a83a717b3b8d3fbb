"""Sink -> channel -> writer, wired with the lifetime rules the service needs.

Leaving `open_pipeline` closes the sink, lets the overflow pump and the writer drain, and
returns only when every accepted row is committed: the shutdown path of the service and
the end of every test that writes. Trades travel beside the rows on their own small
channel to their own writer (`TradeWriter`), drained the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import psycopg
import trio

from greeksd import config
from greeksd.backoff import Backoff
from greeksd.model import Snapshot, Trade
from greeksd.sink import ChannelSink
from greeksd.store.spool import Spool
from greeksd.store.trade_writer import TradeWriter
from greeksd.store.writer import Writer


@dataclass
class Pipeline:
    sink: ChannelSink
    writer: Writer
    trade_writer: TradeWriter


@contextlib.asynccontextmanager
async def open_pipeline(
    url: str,
    *,
    flush_rows: int = config.FLUSH_ROWS,
    flush_ms: int = config.FLUSH_MS,
    queue_size: int = config.QUEUE_SIZE,
    slo_ms: int = config.LATENCY_SLO_MS,
    spool: Spool | None = None,
    trade_queue_size: int = 10_000,
    db_timeout_s: float = config.DB_TIMEOUT_S,
    schema_ready: trio.Event | None = None,
    backoff: Backoff | None = None,
    connect: Callable[[str], psycopg.Connection] | None = None,
    instance: str | None = None,
    store_payload: bool = config.STORE_PAYLOAD,
) -> AsyncIterator[Pipeline]:
    send, receive = trio.open_memory_channel[Snapshot](queue_size)
    trade_send, trade_receive = trio.open_memory_channel[Trade](trade_queue_size)
    writer = Writer(
        url,
        flush_rows=flush_rows,
        flush_ms=flush_ms,
        slo_ms=slo_ms,
        spool=spool,
        timeout_s=db_timeout_s,
        schema_ready=schema_ready,
        backoff=backoff,
        connect=connect,
        instance=instance,
        store_payload=store_payload,
    )
    sink = ChannelSink(send, trade_send, on_conflate=writer.note_conflated)
    trade_writer = TradeWriter(url, timeout_s=db_timeout_s, schema_ready=schema_ready)

    async def pump_then_close() -> None:
        async with send:
            await sink.pump_overflow()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        nursery.start_soon(trade_writer.run, trade_receive)
        nursery.start_soon(pump_then_close)
        try:
            yield Pipeline(sink, writer, trade_writer)
        finally:
            sink.close()
            trade_send.close()
