"""Placement: a new session goes to the worker with the most free KV slots, then the shortest queue."""

from __future__ import annotations

from hub_server.placement import DRAINING, LOST, READY, WorkerLoad, placement_order


def test_most_free_slots_first_then_the_shortest_queue_then_the_id():
    loads = [
        WorkerLoad("w0", READY, free_slots=3, queue_depth=0),
        WorkerLoad("w1", READY, free_slots=5, queue_depth=4),
        WorkerLoad("w2", READY, free_slots=5, queue_depth=1),
        WorkerLoad("w3", READY, free_slots=5, queue_depth=1),
    ]
    assert placement_order(loads) == ["w2", "w3", "w1", "w0"]


def test_full_draining_and_lost_workers_take_no_new_session():
    loads = [
        WorkerLoad("full", READY, free_slots=0, queue_depth=0),
        WorkerLoad("drain", DRAINING, free_slots=9, queue_depth=0),
        WorkerLoad("lost", LOST, free_slots=9, queue_depth=0),
        WorkerLoad("ok", READY, free_slots=1, queue_depth=7),
    ]
    assert placement_order(loads) == ["ok"]
    assert placement_order(loads[:3]) == []  # every worker full: the hub answers 429 hub_full
