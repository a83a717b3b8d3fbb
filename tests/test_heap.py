"""greeksd.heap: what a long-running process does to its collector after startup."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from greeksd import heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("restored_gc")
def test_settle_freezes_the_startup_heap_and_collects_young_objects_less_often() -> None:
    class Node:
        other: object = None

    startup = Node()
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
    assert sys.getswitchinterval() == pytest.approx(heap.SWITCH_INTERVAL_S)
    assert not any(o is startup for o in gc.get_objects())  # never walked again
    cycle_a, cycle_b = Node(), Node()  # garbage made after startup is still collected
    cycle_a.other, cycle_b.other = cycle_b, cycle_a
    gc.collect()
    assert any(o is cycle_a for o in gc.get_objects())  # alive while referenced
    del cycle_a, cycle_b
    assert gc.collect() >= 2
