"""Rolling write-latency histogram (persisted_at - received_at).

Fixed log-spaced buckets, one set per second in a 60-slot ring: recording is O(1) per
value, percentiles over the last minute merge at most 60 small arrays, and memory is
constant whatever the tick rate. A cumulative copy feeds Prometheus.
"""

from __future__ import annotations

import bisect
import math

# Upper bounds in ms: 0.1 ms .. ~100 s, ~12% apart, so a percentile is off by < 12%.
BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 1.12**i for i in range(123))
PROMETHEUS_BOUNDS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class LatencyHistogram:
    def __init__(self, window_s: int = 60) -> None:
        self._window = window_s
        self._slots: list[list[int]] = [[0] * (len(BOUNDS_MS) + 1) for _ in range(window_s)]
        self._slot_second: list[int] = [-1] * window_s
        self._slot_max: list[float] = [0.0] * window_s
        self.prometheus_counts: list[int] = [0] * (len(PROMETHEUS_BOUNDS_S) + 1)
        self.count = 0
        self.sum_s = 0.0

    def _slot(self, now_s: float) -> int:
        second = int(now_s)
        index = second % self._window
        if self._slot_second[index] != second:
            self._slot_second[index] = second
            self._slots[index] = [0] * (len(BOUNDS_MS) + 1)
            self._slot_max[index] = 0.0
        return index

    def _in_window(self, now_s: float) -> list[int]:
        current = int(now_s)
        return [
            i
            for i, second in enumerate(self._slot_second)
            if second >= 0 and current - second < self._window
        ]

    def window_max(self, now_s: float) -> float | None:
        """The largest latency (ms) recorded in the last `window_s` seconds."""
        return max((self._slot_max[i] for i in self._in_window(now_s)), default=None)

    def record(self, latencies_ms: list[float], now_s: float) -> None:
        """Record one batch's latencies, stamped at wall-clock second `now_s`."""
        index = self._slot(now_s)
        slot = self._slots[index]
        prom = self.prometheus_counts
        for value in latencies_ms:
            slot[bisect.bisect_left(BOUNDS_MS, value)] += 1
            prom[bisect.bisect_left(PROMETHEUS_BOUNDS_S, value / 1000.0)] += 1
        if latencies_ms:
            self._slot_max[index] = max(self._slot_max[index], *latencies_ms)
        self.count += len(latencies_ms)
        self.sum_s += sum(latencies_ms) / 1000.0

    def percentiles(
        self, now_s: float, quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)
    ) -> dict[float, float | None]:
        """Upper-bound estimate (ms) of each quantile over the last `window_s` seconds,
        never above the largest value seen there (a bucket bound can be up to 12% over)."""
        window = self._in_window(now_s)
        merged = [0] * (len(BOUNDS_MS) + 1)
        for index in window:
            for i, n in enumerate(self._slots[index]):
                if n:
                    merged[i] += n
        largest = max((self._slot_max[i] for i in window), default=math.inf)
        total = sum(merged)
        result: dict[float, float | None] = {}
        for q in quantiles:
            if total == 0:
                result[q] = None
                continue
            rank = max(1, math.ceil(q * total))
            seen = 0
            for i, n in enumerate(merged):
                seen += n
                if seen >= rank:
                    result[q] = min(BOUNDS_MS[i] if i < len(BOUNDS_MS) else math.inf, largest)
                    break
        return result
