"""Backpressure conflation, latency percentiles, log redaction: pure logic."""

from __future__ import annotations

import logging

import trio

from greeksd.latency import LatencyHistogram
from greeksd.logs import KeyValueFormatter, get_logger
from greeksd.model import Snapshot
from greeksd.redact import redact, register_secret
from greeksd.sink import ChannelSink
from tests.factories import make_snapshot


async def test_full_channel_conflates_per_contract_and_keeps_newest() -> None:
    send, receive = trio.open_memory_channel[Snapshot](2)
    sink = ChannelSink(send)
    first, second = make_snapshot(0), make_snapshot(1)  # different contracts (strike)
    sink.put(first)
    sink.put(second)
    same_contract = [make_snapshot(5, delta=0.1 * k) for k in range(4)]  # strike of i=0
    for snap in same_contract:
        sink.put(snap)
    assert sink.accepted == 6 and sink.conflated == 3 and sink.overflow_size == 1
    received: list[Snapshot] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.pump_overflow)
        for _ in range(3):
            received.append(await receive.receive())
        sink.close()
    assert received == [first, second, same_contract[-1]]


def test_percentiles_over_last_minute() -> None:
    histogram = LatencyHistogram()
    histogram.record([float(v) for v in range(1, 101)], now_s=1000.0)
    pct = histogram.percentiles(1000.5)
    assert 45 <= pct[0.5] <= 56  # type: ignore[operator]
    assert 90 <= pct[0.95] <= 100  # type: ignore[operator]
    assert pct[0.99] == 100.0, "a bucket's upper bound is clamped to the largest value"
    assert histogram.window_max(1000.5) == 100.0
    assert histogram.percentiles(1061.0)[0.95] is None, "older than the window"
    assert histogram.window_max(1061.0) is None
    histogram.record([2000.0], now_s=1061.0)
    assert histogram.percentiles(1061.0)[0.5] == 2000.0
    assert histogram.window_max(1061.0) == 2000.0


def test_log_lines_are_key_value_and_secrets_are_masked(caplog: object) -> None:
    register_secret("sekrit-token-42")
    record = logging.LogRecord("greeksd.test", logging.INFO, __file__, 1, "login", None, None)
    record.context = {"broker": "ibkr"}  # type: ignore[attr-defined]
    record.fields = {
        "cookie": 'api={"session": "abcdef"}',  # type: ignore[attr-defined]
        "url": "postgresql://me:pw1234@h/db",
        "token": "sekrit-token-42",
    }
    line = KeyValueFormatter().format(record)
    assert "event=login" in line and "broker=ibkr" in line
    for secret in ("abcdef", "pw1234", "sekrit-token-42"):
        assert secret not in line
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    get_logger("greeksd.test").info("still_works", n=1)
