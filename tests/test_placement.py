"""Placement, the session table and lost workers, in process: the front end's rules with several
fake engines (tests/test_service.py's counting target), no Ray and no model. The same rules with
real Ray workers: tests/test_ray_workers.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.engine_api import EngineStats, KVHandle
from hub_server.errors import HubFull, KVMemoryFull, NotReady, RateLimited, SessionNotFound, UnknownWorker, WorkerLost
from hub_server.placement import DRAINING, LOST, READY, WorkerIdentity, WorkerLoad, placement_order
from hub_server.service import Hub
from tests.test_service import ALICE, BOB, CountingTarget, feed, metric, open_request, verify


class MortalTarget(CountingTarget):
    """A counting target in "another process": it answers probes until it dies, and comes back
    as a new incarnation with an empty KV pool."""

    def __init__(self, slots: int = 4):
        super().__init__(slots=slots)
        self.slots = slots
        self.incarnation = 0
        self.alive = True

    def probe(self) -> WorkerIdentity:
        if not self.alive:
            raise WorkerLost("gone")
        return WorkerIdentity("node-a", 4242, "cpu", str(self.incarnation))

    def rest(self, seconds: float) -> None:
        time.sleep(seconds)

    def new_kv(self, scope: str | None = None) -> KVHandle | None:
        if not self.alive:
            raise WorkerLost("gone")
        return super().new_kv(scope)

    def die(self) -> None:
        self.alive = False

    def restart(self) -> None:
        incarnation = self.incarnation
        self.__init__(self.slots)  # type: ignore[misc]
        self.incarnation = incarnation + 1


def hub_of(*engines: CountingTarget, **settings: object) -> Hub:
    return Hub(HubSettings(model="unused", **settings), engines)  # type: ignore[arg-type]


def test_placement_prefers_free_slots_then_the_shorter_queue_and_skips_full_or_unready_workers():
    loads = [
        WorkerLoad("0", READY, free_slots=2, queue_depth=0),
        WorkerLoad("1", READY, free_slots=5, queue_depth=3),
        WorkerLoad("2", READY, free_slots=5, queue_depth=1),
        WorkerLoad("3", READY, free_slots=0, queue_depth=0),
        WorkerLoad("4", DRAINING, free_slots=9, queue_depth=0),
        WorkerLoad("5", LOST, free_slots=9, queue_depth=0),
    ]
    assert placement_order(loads) == ["2", "1", "0"]
    assert placement_order([WorkerLoad("0", READY, 0, 0)]) == []


def test_sessions_spread_over_workers_and_each_request_goes_to_its_own_worker():
    first, second = CountingTarget(slots=4), CountingTarget(slots=4)
    hub = hub_of(first, second, max_sessions=4)
    sessions = [hub.open_session(open_request(first)).session_id for _ in range(4)]
    assert (len(first.free), len(second.free)) == (2, 2)
    for session in sessions:
        assert verify(hub, session, [3], [4, 5]).tokens == [4, 5, 6]
    assert (len(first.passes), len(second.passes)) == (2, 2)
    assert [w.sessions for w in hub.workers.listing().workers] == [2, 2]


def test_hub_full_only_when_every_worker_is_full():
    first, second = CountingTarget(slots=1), CountingTarget(slots=1)
    hub = hub_of(first, second, max_sessions=1)
    hub.open_session(open_request(first))
    hub.open_session(open_request(first))  # the first worker is full: the second takes it
    with pytest.raises(HubFull, match="2 ready workers \\(of 2\\) serve their maximum of 1 sessions each"):
        hub.open_session(open_request(first))


def test_per_user_limits_and_ownership_hold_across_workers():
    first, second = CountingTarget(), CountingTarget()
    hub = hub_of(first, second, max_sessions_per_user=2)
    alice = [hub.open_session(open_request(first), owner=ALICE).session_id for _ in range(2)]
    assert {hub.sessions.get(s, ALICE).worker_id for s in alice} == {"0", "1"}
    with pytest.raises(RateLimited, match="already has 2 open sessions"):
        hub.open_session(open_request(first), owner=ALICE)
    for session in alice:  # whichever worker holds it, it is not bob's
        with pytest.raises(SessionNotFound):
            verify(hub, session, [1], [2], owner=BOB)
        with pytest.raises(SessionNotFound):
            asyncio.run(hub.close(session, owner=BOB))


def test_a_drained_worker_takes_no_new_sessions_while_its_open_ones_go_on():
    first, second = CountingTarget(), CountingTarget()
    hub = hub_of(first, second)
    on_first = hub.open_session(open_request(first)).session_id
    assert hub.workers.drain("0").state == DRAINING
    for _ in range(3):
        assert hub.sessions.get(hub.open_session(open_request(first)).session_id).worker_id == "1"
    assert verify(hub, on_first, [3], [4]).tokens == [4, 5]
    with pytest.raises(UnknownWorker, match="no worker '7'"):
        hub.workers.drain("7")
    assert hub.workers.undrain("0").state == READY
    assert hub.sessions.get(hub.open_session(open_request(first)).session_id).worker_id == "0"


def test_a_lost_worker_drops_its_sessions_and_rejoins_once_restarted():
    steady, mortal = CountingTarget(), MortalTarget()
    hub = hub_of(steady, mortal)
    sessions = [hub.open_session(open_request(steady)).session_id for _ in range(2)]
    lost, kept = sorted(sessions, key=lambda s: hub.sessions.get(s).worker_id, reverse=True)
    mortal.die()
    hub.workers.probe(hub.workers[1])
    assert hub.workers.ready_count() == wire.WorkerCount(ready=1, total=2)
    with pytest.raises(SessionNotFound):  # the client reopens it, on the worker that lives
        verify(hub, lost, [1], [2])
    assert verify(hub, kept, [1], [2]).tokens == [2, 3]
    assert hub.sessions.get(hub.open_session(open_request(steady)).session_id).worker_id == "0"
    mortal.restart()
    hub.workers.probe(hub.workers[1])
    assert [w.state for w in hub.workers.listing().workers] == [READY, READY]
    assert hub.workers.listing().workers[1].restarts == 1
    assert hub.sessions.get(hub.open_session(open_request(steady)).session_id).worker_id == "1"


def test_a_hub_whose_every_worker_died_answers_not_ready_until_one_is_back():
    mortals = MortalTarget(), MortalTarget()
    hub = hub_of(*mortals)
    for mortal in mortals:
        mortal.die()  # not probed yet: the slot calls that fail probe them at once
    with pytest.raises(NotReady, match="no engine worker of this hub is up"):  # 503: clients wait it out
        hub.open_session(open_request(mortals[0]))
    assert hub.workers.ready_count() == wire.WorkerCount(ready=0, total=2)
    mortals[1].restart()
    hub.workers.probe(hub.workers[1])
    assert hub.sessions.get(hub.open_session(open_request(mortals[0])).session_id).worker_id == "1"


def test_a_worker_that_restarted_between_two_probes_is_lost_and_back_at_once():
    steady, mortal = CountingTarget(), MortalTarget()
    hub = hub_of(steady, mortal)
    sessions = [hub.open_session(open_request(steady)).session_id for _ in range(2)]
    on_mortal = next(s for s in sessions if hub.sessions.get(s).worker_id == "1")
    mortal.restart()  # its KV pool is empty now: the session's cache is gone
    hub.workers.probe(hub.workers[1])
    with pytest.raises(SessionNotFound):
        verify(hub, on_mortal, [1], [2])
    assert hub.workers[1].state == READY


def test_one_worker_reports_its_series_unlabelled_and_several_label_theirs():
    single = hub_of(CountingTarget())
    assert metric(single, "specedge_device_busy_seconds_total") == 0.25
    assert 'worker="' not in single.metrics_page().decode()
    several = hub_of(CountingTarget(), CountingTarget())
    assert metric(several, 'specedge_device_busy_seconds_total{worker="1"}') == 0.25
    assert metric(several, 'specedge_verify_passes_total{worker="0",sessions="2"}') == 3
    assert metric(several, "specedge_device_busy_seconds_total") == 0.5  # summed over the workers
    assert metric(several, "specedge_workers_ready") == 2


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


def test_the_most_free_blocks_a_session_first_then_free_slots_and_none_on_a_worker_without_blocks():
    loads = [
        WorkerLoad("roomy-but-busy", READY, free_slots=4, queue_depth=0, free_blocks=90, sessions=8),  # 10 each
        WorkerLoad("quiet", READY, free_slots=11, queue_depth=9, free_blocks=40, sessions=1),  # 20 each
        WorkerLoad("as-roomy-fewer", READY, free_slots=11, queue_depth=5, free_blocks=20, sessions=1),  # 10
        WorkerLoad("no-blocks", READY, free_slots=12, queue_depth=0, free_blocks=0, sessions=0),
        WorkerLoad("uncounted", READY, free_slots=12, queue_depth=0),  # an engine without blocks: by slots
    ]
    assert placement_order(loads) == ["quiet", "as-roomy-fewer", "roomy-but-busy", "uncounted"]
    # Two idle workers whose pools differ by a few blocks take sessions in turn, not all on the larger.
    bigger, smaller = WorkerLoad("0", READY, 8, 0, 1000, 0), WorkerLoad("1", READY, 8, 0, 996, 0)
    assert placement_order([bigger, smaller])[0] == "0"
    assert placement_order([replace(bigger, free_slots=7, free_blocks=996, sessions=1), smaller])[0] == "1"


class PagedTarget(CountingTarget):
    """A counting target whose KV memory is `blocks` blocks of 16 tokens, taken as contexts grow."""

    def __init__(self, blocks: int):
        super().__init__(slots=8)
        self.blocks, self.held = blocks, {}

    def used(self) -> int:
        return sum(self.held.values())

    def new_kv(self, scope: str | None = None) -> KVHandle | None:
        return super().new_kv(scope) if self.used() < self.blocks else None

    def reserve(self, kv: KVHandle, tokens: int) -> bool:
        wanted = max(-(-tokens // 16), self.held.get(kv.index, 0))
        if self.used() - self.held.get(kv.index, 0) + wanted > self.blocks:
            return False
        self.held[kv.index] = wanted
        return True

    def release(self, kv: KVHandle) -> None:
        self.held.pop(kv.index, None)
        super().release(kv)

    def stats(self) -> EngineStats:
        return replace(super().stats(), kv_blocks=self.blocks, kv_blocks_used=self.used())


def test_sessions_go_where_blocks_are_free_and_a_full_worker_evicts_only_its_own_idle_sessions():
    workers = PagedTarget(blocks=4), PagedTarget(blocks=4)
    hub = hub_of(*workers, max_sessions=8)
    table = {}

    def open_and_feed(tokens: int) -> str:
        session = hub.open_session(open_request(workers[0])).session_id
        feed(hub, session, list(range(1, tokens + 1)))
        table.update({s.session_id: s for s in hub.sessions.all()})
        return session

    idle_here = open_and_feed(40)  # worker 0: 3 blocks of 4
    idle_there = open_and_feed(50)  # worker 1 has more blocks free: all 4 of its blocks
    growing = open_and_feed(10)  # worker 0, its last block: worker 1 has none left, for all its one session
    assert [table[s].worker_id for s in (idle_here, idle_there, growing)] == ["0", "1", "0"]
    with pytest.raises(HubFull, match="KV memory is full"):  # free slots, but no block anywhere
        hub.open_session(open_request(workers[0]))
    table[idle_there].last_used -= 90  # the hub's longest idle, but its memory is on the other worker
    table[idle_here].last_used -= 60
    assert verify(hub, growing, [11], [12, 13, 14, 15, 16, 17, 40]).tokens == list(range(12, 19))
    assert {s.session_id for s in hub.sessions.all()} == {idle_there, growing}
    assert metric(hub, "specedge_evicted_for_memory_total") == 1
    assert metric(hub, "specedge_evicted_sessions_total") == 1
    # Worker 0 is full again, and its only other session idled 2 s: 503, and when to come back.
    resting = open_and_feed(30)
    assert table[resting].worker_id == "0"
    table[resting].last_used -= 2
    with pytest.raises(KVMemoryFull) as refused:
        verify(hub, growing, [], list(range(19, 40)))
    assert refused.value.retry_after_s == 3  # the 5 s floor less the 2 s idled
    assert len(hub.sessions) == 3 and metric(hub, "specedge_evicted_for_memory_total") == 1
