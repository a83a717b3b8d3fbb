"""Garbage collection for a process that streams rows: `settle()` once its startup is done.

CPython's cyclic collector walks every tracked object of a generation when it runs. In a
running service most of the heap is what startup made (modules, settings, sources,
the API app): a full collection walked all of it, 40-65 ms on the 2-core bench box,
twice in a 10-second run at 5,000 ticks/s, with every row in flight waiting (measured
with gc.callbacks in the end-to-end worker). `gc.freeze()` moves that heap out of the
collector's sight for good, so later collections only walk what the stream made since;
a larger first-generation threshold (the default is 700 allocations, a few rows' worth)
makes the young collections ~15x rarer, each still a few ms at most. Garbage cycles are
still collected: only objects that exist at the freeze are never walked again.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) of tracked objects between young collections."""


def settle() -> None:
    """Collect what startup left, freeze the rest, and collect young objects less often:
    call once, after startup (imports, settings, sources built), before the streams."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
