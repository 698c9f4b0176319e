"""Prompts fed in chunks by a worker's scheduler beside other sessions' verifies, on the real
runner: every reply equals the target decoding alone. Greedy and seeded sessions, chain and tree
drafts, on the Llama target and on a Gemma 3 target whose sliding window (8 tokens) the prompts
pass; a session's second turn goes in chunks across the steps that carry the verifies of the
sessions it shared its earlier passes with; a prompt cancelled halfway leaves a session whose
next pass brings in the rest.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import pytest

from hub_server.config import HubSettings
from hub_server.engine.cpu.products import onednn_available
from hub_server.engine.kv_pool import SessionKV
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.scheduler import Prompt, Scheduler
from hub_server.tree import chain_parents
from tests.conftest import ATTENTION, TargetAlone, plain_target
from tests.test_runner import gemma_dir  # noqa: F401 (a fixture: the Gemma target with a sliding window)

CHUNK = 16  # prompt tokens a step carries (the scheduler's least): prompts of 45-90 tokens take several steps
AHEAD = 100  # tokens of each session's continuation by the target alone worked out beforehand
NO_STOP: frozenset[int] = frozenset()


@pytest.fixture(scope="module", params=["llama", "gemma-sliding"])
def target(request, tiny, gemma_dir):  # noqa: F811
    folder = tiny.hf_dir if request.param == "llama" else gemma_dir
    products = "onednn" if onednn_available() else "mkl"
    runner = ModelRunner(HubSettings(model=str(folder), cpu_matmul=products, attention=ATTENTION))
    return runner, plain_target(folder)


@dataclass
class User:
    """A session as the hub keeps one: its context (all of it, the prompt not yet in the KV
    included), its KV, its sampling, and each reply with the context it answered."""

    name: str
    kv: SessionKV
    context: list[int]
    temperature: float = 0.0
    seed: int = 0
    tree: bool = False
    replies: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (emitted, the target alone's)
    script: list[int] = field(default_factory=list)  # the context and the target alone's continuation of it

    def foresee(self, alone: TargetAlone) -> None:
        """Work out the target alone's next AHEAD tokens, so that drafts need no model while passes run."""
        self.script = self.context + alone.decode(self.context, AHEAD, temperature=self.temperature, seed=self.seed)


def new_kv(runner: ModelRunner) -> SessionKV:
    kv = runner.new_kv()
    assert kv is not None
    return kv


def feed_chunk(runner: ModelRunner):
    """What a worker's scheduler runs for a prompt's chunk (as `supervision.Workers` does): `tokens`
    more of the session's context into its KV, never its last token (the next pass brings it)."""

    def run_prompt(user: User, tokens: int) -> None:
        upto = min(user.kv.length + tokens, len(user.context) - 1)
        runner.prefill(user.kv, user.context[: upto + 1])

    return run_prompt


def words(seed: int, length: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=length)


def draft_for(user: User, rng: random.Random) -> tuple[list[int], list[int]]:
    """A draft the target accepts in part: its own next tokens with one changed (a chain), or
    those beside a wrong first branch (a tree: the root has two children)."""
    right = user.script[len(user.context) : len(user.context) + 4]
    assert len(right) == 4, "the test ran past the continuation it worked out"
    if user.tree:
        wrong = (right[0] + 1) % 500
        return [wrong, *right[:3]], [-1, -1, 1, 2]
    chain = list(right)
    cut = rng.randrange(1, 4)
    chain[cut] = (chain[cut] + 7) % 500
    return chain, chain_parents(len(chain))


def verify_round(scheduler: Scheduler, users: list[User], rng: random.Random) -> None:
    """One verify of each user, all in one pass (announced, so the batch waits for all of them)."""
    jobs = []
    with scheduler.announce():
        for user in users:
            draft, parents = draft_for(user, rng)
            job = VerifyJob(
                user.kv, user.context[user.kv.length :], draft, parents, user.temperature, user.seed, NO_STOP
            )
            jobs.append((user, job, scheduler.submit(job)))
    for user, job, future in jobs:
        future.result(timeout=60)
        expected = user.script[len(user.context) : len(user.context) + len(job.emitted)]
        user.replies.append((job.emitted, expected))
        user.context += job.emitted


def assert_replies_are_the_targets(users: list[User]) -> None:
    for user in users:
        assert user.replies, user.name
        for emitted, expected in user.replies:  # `expected`: what the target alone decoded there
            assert emitted == expected, user.name


def assert_kv_holds_the_contexts(users: list[User]) -> None:
    for user in users:
        assert user.kv.length == len(user.context) - 1, user.name  # all of its context but the last token


class Device:
    """The runner's passes as the scheduler runs them, each logged: "verify" or "chunk"."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.log: list[str] = []
        self._feed = feed_chunk(runner)

    def verify(self, jobs: list[VerifyJob]) -> None:
        self.log.append("verify")
        self.runner.verify_batch(jobs)

    def chunk(self, user: User, tokens: int) -> None:
        self.log.append("chunk")
        self._feed(user, tokens)

    def scheduler(self, run_prompt=None) -> Scheduler:
        return Scheduler(
            self.verify,
            max_batch=8,
            max_wait_s=60,  # a round's verifies are announced: they share one pass
            run_prompt=run_prompt or self.chunk,
            prompt_budget=lambda jobs: CHUNK,
        )


def test_prompts_in_chunks_beside_verifies_of_greedy_seeded_and_tree_sessions_equal_the_target_alone(target):
    runner, alone = target
    rng = random.Random(0)
    device = Device(runner)
    scheduler = device.scheduler()
    greedy = User("greedy", new_kv(runner), words(1, 12))
    seeded = User("seeded", new_kv(runner), words(2, 9), temperature=0.8, seed=7)
    tree = User("tree", new_kv(runner), words(3, 10), tree=True)
    seeded_tree = User("seeded tree", new_kv(runner), words(4, 11), temperature=1.0, seed=3, tree=True)
    newcomer = User("newcomer", new_kv(runner), words(5, 90), temperature=0.7, seed=11)
    users = [greedy, seeded, tree, seeded_tree]
    for user in [*users, newcomer]:
        user.foresee(alone)
    try:
        for _ in range(3):  # the four share their passes
            verify_round(scheduler, users, rng)
        # The greedy user's second turn and a new session's prompt, in chunks beside the others' verifies.
        greedy.context += words(6, 45)
        greedy.foresee(alone)
        prompts = [
            scheduler.submit_prompt(greedy, len(greedy.context) - 1 - greedy.kv.length),
            scheduler.submit_prompt(newcomer, len(newcomer.context) - 1),
        ]
        while not all(prompt.future.done() for prompt in prompts):
            verify_round(scheduler, [seeded, tree, seeded_tree], rng)
        for prompt in prompts:
            prompt.future.result(timeout=0)
        for _ in range(2):
            verify_round(scheduler, [*users, newcomer], rng)
        assert_kv_holds_the_contexts([*users, newcomer])
    finally:
        scheduler.stop()
        for user in [*users, newcomer]:
            runner.release(user.kv)
    first, last = device.log.index("chunk"), len(device.log) - device.log[::-1].index("chunk")
    assert device.log[first:last].count("verify") >= 2  # verify passes went between the prompts' chunks
    assert_replies_are_the_targets([*users, newcomer])


def test_a_prompt_cancelled_halfway_leaves_a_session_its_next_pass_completes(target):
    runner, alone = target
    rng = random.Random(1)
    device = Device(runner)
    cut_after, submitted = 2, threading.Event()
    prompts: list[Prompt] = []

    def run_prompt(user: User, tokens: int) -> None:
        device.chunk(user, tokens)
        if device.log.count("chunk") == cut_after:  # its caller goes away while this chunk is on the device
            submitted.wait(10)
            scheduler.cancel_prompt(prompts[0])

    scheduler = device.scheduler(run_prompt)
    user = User("cut", new_kv(runner), words(8, 70), temperature=0.9, seed=5)
    other = User("other", new_kv(runner), words(9, 10))
    for each in (user, other):
        each.foresee(alone)
    try:
        prompts.append(scheduler.submit_prompt(user, len(user.context) - 1))
        submitted.set()
        prompts[0].future.result(timeout=60)
        assert user.kv.length == cut_after * CHUNK  # the chunk on the device ended, no more came
        # The session's next pass brings in the rest of its context (at most 64 tokens ride in a
        # verify, as the hub sends them), beside another session's verify.
        verify_round(scheduler, [user, other], rng)
        verify_round(scheduler, [user, other], rng)
        assert_kv_holds_the_contexts([user, other])
    finally:
        scheduler.stop()
        runner.release(user.kv)
        runner.release(other.kv)
    assert device.log.count("chunk") == cut_after
    assert_replies_are_the_targets([user, other])
