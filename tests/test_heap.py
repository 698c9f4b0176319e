"""The start-up heap is frozen out of the collector's way, and nothing dead is kept by it."""

from __future__ import annotations

import gc
import weakref

from hub_server.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_the_start_up_heap_is_frozen_once_its_garbage_is_collected():
    alive, dead = _Node(), _Node()
    gone = weakref.ref(dead)
    del dead
    try:
        frozen = freeze_startup_heap("this test")
        assert gone() is None  # collected first: a frozen heap would have kept it forever
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is alive for obj in gc.get_objects())  # frozen: no collection scans it
    finally:
        gc.unfreeze()
    assert any(obj is alive for obj in gc.get_objects())
