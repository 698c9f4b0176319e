"""The hub's rules (caps, ownership, budgets, checks, eviction, resume) against a fake engine.

The service reaches the engine only through `engine_api.Engine`, so its rules are tested here in
process, in milliseconds, with no model: the fake target's next token is always the last one
plus one. Decoding itself is tested against the real target alone elsewhere.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass

import pytest

from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.engine_api import EngineStats, KVHandle, PassTally, VerifyJob
from hub_server.errors import (
    BadRequest,
    ContextTooLong,
    HubFull,
    KVMemoryFull,
    RateLimited,
    SessionNotFound,
    VocabMismatch,
    WorkerLost,
)
from hub_server.placement import WorkerIdentity
from hub_server.service import Hub
from hub_server.sessions import LOCAL_OWNER, Owner
from hub_server.tree import accept_tree
from hub_server.vocabulary import Vocabulary

VOCAB = 64
ALICE, BOB, CAROL = Owner("acct_a", "alice"), Owner("acct_b", "bob"), Owner("acct_c", "carol")


@dataclass
class FakeSlot:
    index: int
    length: int = 0


class CountingTarget:
    """An `Engine` whose target always continues with the last token plus one (mod VOCAB)."""

    name = "counting-target"

    def __init__(self, slots: int = 4, max_context: int = 64):
        self.vocab = Vocabulary(tuple(f"piece{i}" for i in range(VOCAB)))
        self.vocab_size = VOCAB
        self.max_context = max_context
        self.widest_verify_row = 128
        self.device_lock = threading.Lock()
        self.free = [FakeSlot(i) for i in reversed(range(slots))]
        self.passes: list[int] = []  # sessions in each verify pass

    def new_kv(self, scope: str | None = None) -> KVHandle | None:
        return self.free.pop() if self.free else None

    def release(self, kv: KVHandle) -> None:
        kv.length = 0
        self.free.append(kv)  # type: ignore[arg-type]

    def reserve(self, kv: KVHandle, tokens: int) -> bool:
        return True  # memory enough for any context: the tight case is `TightMemory`

    def prefill(self, kv: KVHandle, context: list[int]) -> None:
        kv.length = len(context) - 1

    def feed(self, kv: KVHandle, pending: list[int]) -> None:
        kv.length += len(pending) - 1

    def verify_batch(self, jobs: list[VerifyJob]) -> float:
        self.passes.append(len(jobs))
        for job in jobs:
            choices = [(job.pending[-1] + 1) % VOCAB] + [(token + 1) % VOCAB for token in job.draft]
            job.path, job.emitted = accept_tree(job.draft, job.parents, choices, job.stop_token_ids)
            job.kv.length += len(job.pending) + len(job.emitted) - 1
        return 0.001 * len(jobs)  # what the pass would have taken on a device

    def pass_fixed_s(self) -> float | None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(0, 4096, 0.25, PassTally(1, 0.5), 0, {2: PassTally(3, 0.75)}, None, None, compiled_hits=5)


def make_hub(**settings) -> tuple[Hub, CountingTarget]:
    engine = CountingTarget(slots=settings.pop("slots", 4), max_context=settings.pop("max_context", 64))
    return Hub(HubSettings(model="unused", **settings), [engine]), engine


def open_request(engine: CountingTarget, **overrides) -> wire.OpenSessionRequest:
    fields = {
        "protocol_version": wire.PROTOCOL_VERSION,
        "vocab_size": engine.vocab.size,
        "vocab_fingerprint": engine.vocab.fingerprint,
    }
    return wire.OpenSessionRequest(**{**fields, **overrides})


def verify(hub: Hub, session_id: str, tokens: list[int], draft: list[int], owner: Owner = LOCAL_OWNER, parents=None):
    request = wire.VerifyRequest(tokens=tokens, draft=draft, parents=parents)
    return asyncio.run(hub.verify(session_id, request, owner))


def feed(hub: Hub, session_id: str, tokens: list[int], owner: Owner = LOCAL_OWNER) -> wire.FeedResponse:
    return asyncio.run(hub.feed(session_id, wire.FeedRequest(tokens=tokens), owner))


def close(hub: Hub, session_id: str, owner: Owner = LOCAL_OWNER) -> None:
    asyncio.run(hub.close(session_id, owner))


def generate(hub: Hub, session_id: str, request: wire.GenerateRequest, on_tokens=lambda tokens: None) -> list[int]:
    """The tokens of a whole generation; `on_tokens` sees them as they come."""

    async def run() -> list[int]:
        tokens: list[int] = []
        generation = await hub.generate(session_id, request)
        try:
            async for chunk in generation:
                tokens += chunk.tokens
                on_tokens(tokens)
        finally:
            await generation.aclose()
        return tokens

    return asyncio.run(run())


def test_a_verify_accepts_what_the_target_would_say_and_adds_its_bonus_token():
    hub, engine = make_hub()
    session = hub.open_session(open_request(engine))
    reply = verify(hub, session.session_id, [5, 6], [7, 8, 30])
    assert (reply.accepted, reply.tokens, reply.context_len) == (2, [7, 8, 9], 5)
    again = verify(hub, session.session_id, [], [10, 11])  # the bonus token 9 is already in the context
    assert (again.accepted, again.tokens, again.context_len) == (2, [10, 11, 12], 8)


def test_a_tree_takes_its_deepest_accepted_path():
    hub, engine = make_hub()
    session = hub.open_session(open_request(engine))
    reply = verify(hub, session.session_id, [1], [9, 2, 3, 4], parents=[-1, -1, 1, 2])
    assert (reply.accepted, reply.tokens) == (3, [2, 3, 4, 5])


def test_a_session_opens_only_for_the_targets_vocabulary_and_protocol():
    hub, engine = make_hub()
    with pytest.raises(VocabMismatch, match="differs from the target"):
        hub.open_session(open_request(engine, vocab_fingerprint="another"))
    with pytest.raises(BadRequest, match="protocol version"):
        hub.open_session(open_request(engine, protocol_version=wire.PROTOCOL_VERSION + 1))
    assert len(engine.free) == 4  # nothing was taken


def test_another_users_session_is_unknown_to_them_for_every_request():
    hub, engine = make_hub()
    alice = hub.open_session(open_request(engine), owner=ALICE).session_id
    with pytest.raises(SessionNotFound):
        verify(hub, alice, [1], [2], owner=BOB)
    with pytest.raises(SessionNotFound):
        feed(hub, alice, [1, 2], owner=BOB)
    with pytest.raises(SessionNotFound):
        close(hub, alice, owner=BOB)
    assert verify(hub, alice, [1], [2], owner=ALICE).accepted == 1  # still hers, untouched


def test_the_per_user_session_cap_and_the_hub_wide_cap():
    hub, engine = make_hub(max_sessions_per_user=2, max_sessions=3, slots=3)
    for _ in range(2):
        hub.open_session(open_request(engine), owner=ALICE)
    with pytest.raises(RateLimited, match="already has 2 open sessions"):
        hub.open_session(open_request(engine), owner=ALICE)
    hub.open_session(open_request(engine), owner=BOB)
    with pytest.raises(HubFull, match="maximum of 3 sessions"):
        hub.open_session(open_request(engine), owner=CAROL)


def test_closing_a_session_gives_its_kv_slot_back():
    hub, engine = make_hub(slots=1, max_sessions=1)
    first = hub.open_session(open_request(engine)).session_id
    verify(hub, first, [1, 2, 3], [4])
    close(hub, first)
    assert len(engine.free) == 1 and engine.free[0].length == 0
    second = hub.open_session(open_request(engine)).session_id
    with pytest.raises(SessionNotFound):
        verify(hub, first, [1], [])
    assert verify(hub, second, [1], [2]).tokens == [2, 3]


def test_a_users_token_budget_is_charged_for_every_token_the_target_computes():
    hub, engine = make_hub(tokens_per_minute=10)
    session = hub.open_session(open_request(engine)).session_id
    verify(hub, session, [1, 2, 3], [4, 5, 6])  # 3 sent + 3 drafted + the bonus: 7
    assert hub.whoami(LOCAL_OWNER).tokens_left == 3
    verify(hub, session, [], [8, 9, 10])  # a request may overdraw what is left ...
    with pytest.raises(RateLimited, match="tokens per minute; retry in"):
        verify(hub, session, [], [12])  # ... and the next waits until the bucket refills


def test_bad_drafts_are_refused_with_what_to_do_and_leave_the_session_as_it_was():
    hub, engine = make_hub(max_draft_tokens=4, max_context=16)
    session = hub.open_session(open_request(engine)).session_id
    with pytest.raises(BadRequest, match="longer than this hub's limit of 4"):
        verify(hub, session, [1], [2, 3, 4, 5, 6])
    with pytest.raises(BadRequest, match="outside this model's vocabulary"):
        verify(hub, session, [1], [VOCAB])
    with pytest.raises(BadRequest, match="no cycles"):
        verify(hub, session, [1], [2, 3], parents=[1, -1])
    with pytest.raises(BadRequest, match="one per token"):
        verify(hub, session, [1], [2, 3], parents=[-1])
    with pytest.raises(ContextTooLong, match="start a new conversation"):
        verify(hub, session, list(range(1, 15)), [15, 16])
    with pytest.raises(BadRequest, match="no context yet"):
        verify(hub, session, [], [2])
    assert verify(hub, session, [1], [2]).context_len == 3  # none of the refusals changed it


def test_an_idle_session_is_evicted_and_the_client_resumes_where_it_was():
    hub, engine = make_hub(session_idle_s=0.2, slots=1, max_sessions=1)
    session = hub.open_session(open_request(engine)).session_id
    history = [1, *verify(hub, session, [1], [2, 3]).tokens]
    deadline = time.monotonic() + 10
    while len(hub.sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(SessionNotFound):
        verify(hub, session, [], [5])
    assert len(engine.free) == 1 and metric(hub, "specedge_evicted_sessions_total") == 1
    resumed = hub.open_session(open_request(engine)).session_id
    feed(hub, resumed, history)
    assert verify(hub, resumed, [], [5, 6]).tokens == [5, 6, 7]


def metric(hub: Hub, series: str) -> float:
    """One series' value on the hub's /metrics page, by its name with labels (`name{a="1"}`),
    read with the one /metrics reader."""
    from specedge_bench.metrics import MetricsPage

    name, _, labels = series.partition("{")
    page = MetricsPage.parse(hub.metrics_page().decode())
    assert page.has(name), f"{name} is not on the page"
    return page.value(name, **dict(re.findall(r'(\w+)="([^"]*)"', labels)))


def test_the_metrics_page_shows_the_engines_figures():
    hub, _ = make_hub()
    assert metric(hub, "specedge_kv_bytes_reserved") == 4096
    assert metric(hub, "specedge_device_busy_seconds_total") == 0.25
    assert metric(hub, "specedge_prefill_seconds_total") == 0.5
    assert metric(hub, 'specedge_verify_passes_total{sessions="2"}') == 3
    assert metric(hub, "process_resident_memory_bytes") > 0
    assert metric(hub, "specedge_compiled_pass_hits_total") == 5
    assert metric(hub, "specedge_past_kv_bytes_copied_total") == 0


def test_each_hub_has_its_own_series_and_verifies_fill_the_histograms():
    first, engine = make_hub()
    second, _ = make_hub()
    session = first.open_session(open_request(engine)).session_id
    verify(first, session, [1, 2], [3, 4, 30])  # 2 accepted + the bonus: 3 tokens
    assert metric(first, "specedge_verify_seconds_count") == 1
    assert metric(first, 'specedge_verify_tokens_bucket{le="3.0"}') == 1
    assert metric(first, 'specedge_verify_tokens_bucket{le="2.0"}') == 0
    assert metric(first, "specedge_sessions_per_pass_count") == 1
    assert metric(first, "specedge_queue_wait_seconds_count") == 1
    assert metric(first, "specedge_pass_device_seconds_count") == 1
    assert metric(first, 'specedge_emitted_tokens_total{mode="specedge"}') == 3
    assert metric(first, "specedge_tokens_per_verify") == 3
    assert metric(second, "specedge_verify_seconds_count") == 0  # another hub in this process: apart


def test_a_full_hub_evicts_only_the_longest_idle_session_and_only_past_the_floor():
    # The week's finding: --max-sessions 4 --session-idle-s 6, four sessions idle 1 s, one new
    # open evicted all four. Now: none has idled long enough, so the new one waits its turn.
    hub, engine = make_hub(max_sessions=4, slots=4, session_idle_s=6)
    sessions = [hub.open_session(open_request(engine)) for _ in range(4)]
    for session in hub.sessions.all():
        session.last_used -= 1.0
    with pytest.raises(HubFull):
        hub.open_session(open_request(engine))
    assert len(hub.sessions) == 4
    # At the default idle limit (600 s): two sessions paused 40 s and 90 s; only the one paused longest goes.
    hub, engine = make_hub(max_sessions=4, slots=4)
    sessions = [hub.open_session(open_request(engine)).session_id for _ in range(4)]
    store = {s.session_id: s for s in hub.sessions.all()}
    store[sessions[1]].last_used -= 40
    store[sessions[2]].last_used -= 90
    hub.open_session(open_request(engine))
    assert {s.session_id for s in hub.sessions.all()} >= {sessions[0], sessions[1], sessions[3]}
    assert sessions[2] not in {s.session_id for s in hub.sessions.all()}
    assert metric(hub, "specedge_evicted_sessions_total") == 1


class TightMemory(CountingTarget):
    """A target whose KV memory holds `capacity` context tokens in all, shared by its sessions."""

    def __init__(self, capacity: int):
        super().__init__(slots=4)
        self.capacity, self.held = capacity, {}

    def reserve(self, kv: KVHandle, tokens: int) -> bool:
        others = sum(held for index, held in self.held.items() if index != kv.index)
        if others + tokens > self.capacity:
            return False
        self.held[kv.index] = max(tokens, self.held.get(kv.index, 0))
        return True

    def release(self, kv: KVHandle) -> None:
        self.held.pop(kv.index, None)
        super().release(kv)


def test_a_session_that_outgrows_the_memory_evicts_the_longest_idle_one_or_is_refused_with_503():
    engine = TightMemory(capacity=40)
    hub = Hub(HubSettings(model="unused", max_sessions=4), [engine])
    idle, growing = (hub.open_session(open_request(engine)).session_id for _ in range(2))
    feed(hub, idle, list(range(1, 21)))
    feed(hub, growing, list(range(1, 16)))
    with pytest.raises(KVMemoryFull) as refused:  # 20 + 22 tokens, and no session idled long enough
        verify(hub, growing, [16], [17, 18, 19, 20, 21, 22])
    assert refused.value.status == 503 and refused.value.retry_after_s > 0
    assert verify(hub, growing, [16], [17, 18]).tokens == [17, 18, 19]  # the refusal changed nothing
    {s.session_id: s for s in hub.sessions.all()}[idle].last_used -= 60
    assert verify(hub, growing, [], [20, 21, 22, 23, 24, 25]).tokens == list(range(20, 27))
    assert idle not in {s.session_id for s in hub.sessions.all()}
    assert metric(hub, "specedge_evicted_sessions_total") == 1


class Accounts:
    """The accounts as the hub sees them: which still exist."""

    def __init__(self, *owners: Owner):
        self.alive = set(owners)

    def gone(self, owners: set[Owner]) -> set[Owner]:
        return owners - self.alive


def test_sessions_belong_to_the_account_and_close_when_it_is_removed():
    hub, engine = make_hub(slots=3, max_sessions=3)
    accounts = Accounts(ALICE, CAROL)
    hub.retirement.accounts = accounts
    old = hub.open_session(open_request(engine), owner=CAROL).session_id
    hub.open_session(open_request(engine), owner=ALICE)
    verify(hub, old, [1], [2], owner=CAROL)
    carol_again = Owner("acct_c2", "carol")  # removed, then added again under the same name
    with pytest.raises(SessionNotFound):
        verify(hub, old, [], [3], owner=carol_again)
    assert hub.whoami(carol_again).sessions == 0
    accounts.alive.discard(CAROL)
    hub.retirement.close_sessions_of_removed_accounts()
    assert len(hub.sessions) == 1 and len(engine.free) == 2  # her slot is free again
    with pytest.raises(SessionNotFound):
        verify(hub, old, [], [3], owner=CAROL)
    assert metric(hub, "specedge_sessions_closed_account_removed_total") == 1


class LosableWorker(CountingTarget):
    """A `CountingTarget` in 'another process': probed, and lost once `lost` is set (its slots with it)."""

    def __init__(self, name: str, **kwargs):
        super().__init__(**kwargs)
        self.lost = False
        self.identity = WorkerIdentity("node", 1, "cpu", name)

    def probe(self) -> WorkerIdentity:
        if self.lost:
            raise WorkerLost("the engine worker holding this session was lost; open a new session")
        return self.identity

    def rest(self, seconds: float) -> None:
        time.sleep(seconds)

    def new_kv(self, scope: str | None = None) -> KVHandle | None:
        if self.lost:
            raise WorkerLost("lost")
        return super().new_kv()

    def verify_batch(self, jobs: list[VerifyJob]) -> float:
        if self.lost:
            raise WorkerLost("lost")
        return super().verify_batch(jobs)


def test_a_generation_whose_worker_is_lost_goes_on_on_another_and_gives_the_same_tokens():
    first, second = LosableWorker("first"), LosableWorker("second")
    hub = Hub(HubSettings(model="unused"), [first, second])
    session = hub.open_session(open_request(first)).session_id
    holder = first if len(first.free) < 4 else second
    request = wire.GenerateRequest(mode="autoregressive", tokens=[3, 4], max_tokens=12)

    def lose_after_three(tokens: list[int]) -> None:
        if len(tokens) == 3:
            holder.lost = True  # its process is gone mid-stream

    tokens = generate(hub, session, request, lose_after_three)
    assert tokens == [(5 + i) % VOCAB for i in range(12)]  # undisturbed: the counting target's own
    moved = next(s for s in hub.sessions.all() if s.session_id == session)
    other = second if holder is first else first
    assert hub.workers[int(moved.worker_id)].engine is other and len(other.free) == 3
    # The probe then notices the loss; the moved session is not dropped with the lost worker's.
    deadline = time.monotonic() + 10
    while hub.workers.ready_count().ready == 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.workers.ready_count().ready == 1
    assert generate(hub, session, wire.GenerateRequest(mode="autoregressive", max_tokens=2)) == [17, 18]
