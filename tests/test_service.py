"""The hub's rules (caps, ownership, budgets, checks, eviction, resume) against a fake engine.

The service reaches the engine only through `engine_api.Engine`, so its rules are tested here in
process, in milliseconds, with no model: the fake target's next token is always the last one
plus one. Decoding itself is tested against the real target alone elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.engine_api import EngineStats, KVHandle, PassTally, VerifyJob
from hub_server.errors import BadRequest, ContextTooLong, HubFull, RateLimited, SessionNotFound, VocabMismatch
from hub_server.service import Hub
from hub_server.tree import accept_tree
from hub_server.vocabulary import Vocabulary

VOCAB = 64


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
        self.device_lock = threading.Lock()
        self.free = [FakeSlot(i) for i in reversed(range(slots))]
        self.passes: list[int] = []  # sessions in each verify pass

    def new_kv(self) -> KVHandle | None:
        return self.free.pop() if self.free else None

    def release(self, kv: KVHandle) -> None:
        kv.length = 0
        self.free.append(kv)  # type: ignore[arg-type]

    def prefill(self, kv: KVHandle, context: list[int]) -> None:
        kv.length = len(context) - 1

    def verify_batch(self, jobs: list[VerifyJob]) -> None:
        self.passes.append(len(jobs))
        for job in jobs:
            choices = [(job.pending[-1] + 1) % VOCAB] + [(token + 1) % VOCAB for token in job.draft]
            job.path, job.emitted = accept_tree(job.draft, job.parents, choices, job.stop_token_ids)
            job.kv.length += len(job.pending) + len(job.emitted) - 1

    def pass_fixed_s(self) -> float | None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(0, 4096, 0.25, PassTally(1, 0.5), 0, {2: PassTally(3, 0.75)}, None, None)


def make_hub(**settings) -> tuple[Hub, CountingTarget]:
    engine = CountingTarget(slots=settings.pop("slots", 4), max_context=settings.pop("max_context", 64))
    return Hub(HubSettings(model="unused", **settings), engine), engine


def open_request(engine: CountingTarget, **overrides) -> wire.OpenSessionRequest:
    fields = {
        "protocol_version": wire.PROTOCOL_VERSION,
        "vocab_size": engine.vocab.size,
        "vocab_fingerprint": engine.vocab.fingerprint,
    }
    return wire.OpenSessionRequest(**{**fields, **overrides})


def verify(hub: Hub, session_id: str, tokens: list[int], draft: list[int], owner: str = "local", parents=None):
    request = wire.VerifyRequest(tokens=tokens, draft=draft, parents=parents)
    return asyncio.run(hub.verify(session_id, request, owner))


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
    alice = hub.open_session(open_request(engine), owner="alice").session_id
    with pytest.raises(SessionNotFound):
        verify(hub, alice, [1], [2], owner="bob")
    with pytest.raises(SessionNotFound):
        hub.feed(alice, wire.FeedRequest(tokens=[1, 2]), owner="bob")
    with pytest.raises(SessionNotFound):
        hub.close(alice, owner="bob")
    assert verify(hub, alice, [1], [2], owner="alice").accepted == 1  # still hers, untouched


def test_the_per_user_session_cap_and_the_hub_wide_cap():
    hub, engine = make_hub(max_sessions_per_user=2, max_sessions=3, slots=3)
    for _ in range(2):
        hub.open_session(open_request(engine), owner="alice")
    with pytest.raises(RateLimited, match="already has 2 open sessions"):
        hub.open_session(open_request(engine), owner="alice")
    hub.open_session(open_request(engine), owner="bob")
    with pytest.raises(HubFull, match="maximum of 3 sessions"):
        hub.open_session(open_request(engine), owner="carol")


def test_closing_a_session_gives_its_kv_slot_back():
    hub, engine = make_hub(slots=1, max_sessions=1)
    first = hub.open_session(open_request(engine)).session_id
    verify(hub, first, [1, 2, 3], [4])
    hub.close(first)
    assert len(engine.free) == 1 and engine.free[0].length == 0
    second = hub.open_session(open_request(engine)).session_id
    with pytest.raises(SessionNotFound):
        verify(hub, first, [1], [])
    assert verify(hub, second, [1], [2]).tokens == [2, 3]


def test_a_users_token_budget_is_charged_for_every_token_the_target_computes():
    hub, engine = make_hub(tokens_per_minute=10)
    session = hub.open_session(open_request(engine)).session_id
    verify(hub, session, [1, 2, 3], [4, 5, 6])  # 3 sent + 3 drafted + the bonus: 7
    assert hub.whoami("local").tokens_left == 3
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
    assert len(engine.free) == 1 and hub.metrics.evicted_sessions == 1
    resumed = hub.open_session(open_request(engine)).session_id
    hub.feed(resumed, wire.FeedRequest(tokens=history))
    assert verify(hub, resumed, [], [5, 6]).tokens == [5, 6, 7]


def test_the_metrics_page_shows_the_engines_figures():
    hub, _ = make_hub()
    from specedge_bench.metrics import MetricsPage
    from specedge_common import metric_names as names

    page = MetricsPage.parse(hub.metrics_page())
    assert page.value(names.KV_BYTES_RESERVED) == 4096
    assert page.value(names.DEVICE_BUSY_SECONDS) == 0.25
    assert page.value(names.PREFILL_SECONDS) == 0.5
    assert page.value(names.VERIFY_PASSES, sessions="2") == 3
