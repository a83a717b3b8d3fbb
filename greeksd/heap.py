"""Garbage collection and GIL hand-over for a process that streams rows: `settle()` once
its startup is done.

CPython's cyclic collector walks every tracked object of a generation when it runs. In a
running service most of the heap is what startup made (modules, settings, sources,
the API app): a full collection walked all of it, 40-65 ms on the 2-core bench box,
twice in a 10-second run at 5,000 ticks/s, with every row in flight waiting (measured
with gc.callbacks in the end-to-end worker). `gc.freeze()` moves that heap out of the
collector's sight for good, so later collections only walk what the stream made since;
a larger first-generation threshold (the default is 700 allocations, a few rows' worth)
makes the young collections ~15x rarer, each still a few ms at most. Garbage cycles are
still collected: only objects that exist at the freeze are never walked again.

The same call shortens the GIL's switch interval (5 ms by default) to 1 ms. The writer's
COPY thread lets go of the GIL at every socket write and then has to win it back from the
thread that decodes frames, which holds it for a whole interval: with 5 ms the COPY (and
PostgreSQL behind it) stood idle that long at each chunk. Measured interleaved on the
replay benchmark: mixed pipeline +0.6 % to +10 % per pair, greeksd CPU per row no higher.
"""

from __future__ import annotations

import gc
import sys

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) of tracked objects between young collections."""
SWITCH_INTERVAL_S = 0.001
"""How long a thread may hold the GIL while another waits for it (`sys.setswitchinterval`)."""


def settle() -> None:
    """Collect what startup left, freeze the rest, and collect young objects less often;
    hand the GIL over sooner: call once, after startup (imports, settings, sources
    built), before the streams."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
