"""Bounded, jittered exponential backoff shared by every reconnect and retry loop."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """`next_delay()` grows initial * factor**n up to `maximum`, with full jitter in
    [delay/2, delay] so many clients restarting together do not stampede; `reset()`
    after a success."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return self.rng.uniform(ceiling / 2.0, ceiling)

    def reset(self) -> None:
        self.attempts = 0
