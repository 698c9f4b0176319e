"""The model runner: batched and tree verification against the target decoding alone.

Two tiny targets: the Llama of the other tests (full attention) and a random Gemma 3 with a
sliding window of 8 tokens, so contexts pass the window and the sliding-layer masks are tested;
each through every attention backend the machine has (reference, CPU kernel, FlexAttention).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.cpu.products import onednn_available
from hub_server.engine.kv_pool import BLOCK_TOKENS, SessionKV, blocks_for
from hub_server.engine.layout import ROW_SHAPES_KEPT
from hub_server.engine.projection import draft_shape
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import PassTally, VerifyJob
from hub_server.errors import KVMemoryFull
from hub_server.scheduler import Composition, Scheduler
from hub_server.tree import chain_parents
from tests.conftest import ATTENTION, ATTENTIONS, DEVICE, TargetAlone, plain_target
from tests.tiny_models import build_tiny_gemma

NO_STOP = frozenset()


@pytest.fixture(scope="module")
def gemma_dir(tiny, tmp_path_factory):
    return build_tiny_gemma(tmp_path_factory.mktemp("gemma-tiny"), tiny.hf_dir, kv_heads=2, seed=5)


@pytest.fixture(scope="module", params=[(m, a) for m in ("llama", "gemma-sliding") for a in ATTENTIONS], ids="-".join)
def target(request, tiny, gemma_dir):
    """A runner of each tiny target through each attention backend (eager passes), and the target alone."""
    model, attention = request.param
    folder = tiny.hf_dir if model == "llama" else gemma_dir
    products = "onednn" if onednn_available() else "mkl"
    runner = ModelRunner(HubSettings(model=str(folder), device=DEVICE, cpu_matmul=products, attention=attention))
    return runner, plain_target(folder, DEVICE)


def greedy(target_alone: TargetAlone, context: list[int], n: int) -> list[int]:
    return target_alone.decode(context, n)


@pytest.fixture(autouse=True, params=["levels", "all"])
def projection(request, target):
    """Every test runs with the projection walking the drafts level by level and computing every
    node at once (`auto` chooses one of the two per level, by cost)."""
    runner, _ = target
    runner.walk.mode = request.param
    yield request.param
    runner.walk.mode = "auto"


@pytest.fixture(autouse=True)
def slots_given_back(target):
    """Each test's sessions give their KV slots back, as closed sessions do."""
    runner, _ = target
    taken = []
    runner_new_kv = runner.new_kv
    runner.new_kv = lambda scope=None: taken.append(runner_new_kv(scope)) or taken[-1]
    yield
    del runner.new_kv
    for kv in taken:
        runner.release(kv)


def prefilled(runner: ModelRunner, context: list[int]):
    kv = runner.new_kv()
    runner.prefill(kv, context)
    return kv


def stored_kv(runner: ModelRunner, kv: SessionKV, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a session holds for `layer`, in position order: [H, n, D] each
    (sliding layers: the last window - 1 positions, all a later query can see)."""
    window = runner.kinds[runner.layer_types[layer]]
    first = max(0, kv.length - window + 1) if window else 0
    places = runner.pool.places(kv, list(range(first, kv.length)))
    rows = torch.tensor(places, dtype=torch.long, device=runner.device)
    keys, values = runner.pool.flat(runner.pool.keys[layer]), runner.pool.flat(runner.pool.values[layer])
    return keys[rows].transpose(0, 1), values[rows].transpose(0, 1)


def job(runner, kv, context, draft, parents=None, temperature=0.0, seed=0) -> VerifyJob:
    parents = chain_parents(len(draft)) if parents is None else parents
    return VerifyJob(kv, context[kv.length :], draft, parents, temperature, seed, NO_STOP)


CONTEXTS = [[1, 40, 41, 42], [1, 7] * 9, [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312]]


def test_batched_verify_equals_one_session_at_a_time(target):
    runner, _ = target
    drafts = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16]]
    alone = []
    for context, draft in zip(CONTEXTS, drafts):
        single = job(runner, prefilled(runner, context), context, draft)
        runner.verify_batch([single])
        alone.append(single)
    together = [job(runner, prefilled(runner, c), c, d) for c, d in zip(CONTEXTS, drafts)]
    runner.verify_batch(together)
    for a, t in zip(alone, together):
        assert (a.path, a.emitted) == (t.path, t.emitted)
        assert a.kv.length == t.kv.length
        for layer in range(len(runner.layer_types)):
            torch.testing.assert_close(
                stored_kv(runner, a.kv, layer), stored_kv(runner, t.kv, layer), atol=1e-4, rtol=1e-4
            )


def test_new_prompts_batched_with_drafts_decode_like_the_target_alone(target):
    """Sessions whose whole prompt is still pending share a batch with sessions verifying drafts:
    the scheduler feeds the prompts apart (they save padding on this CPU) and the runner runs
    the pass it is given; or the runner is given them all in one padded pass. Either way every
    reply is the target's own."""
    runner, target_alone = target
    long_prompt = [1] + [(3 * i) % 400 + 20 for i in range(60)]
    contexts = [long_prompt, CONTEXTS[0], CONTEXTS[2]]
    expected = [greedy(target_alone, c, 6) for c in contexts]
    composed = Scheduler(
        runner.verify_batch,
        max_batch=3,
        max_wait_s=60,
        composition=Composition.of(runner.device, runner.widest_verify_row),
        run_feed=lambda job: runner.feed(job.kv, job.pending),
    )
    for scheduler in (composed, None):
        slots = [runner.new_kv(), prefilled(runner, contexts[1]), prefilled(runner, contexts[2])]
        jobs = [job(runner, kv, c, e[:5]) for kv, c, e in zip(slots, contexts, expected)]
        assert len(jobs[0].pending) == len(long_prompt)
        feeds, in_verify = runner.stats().feeds, runner.context_in_verify
        if scheduler is None:
            runner.verify_batch(jobs)
            assert runner.stats().feeds == feeds and runner.context_in_verify > in_verify  # one padded pass
        else:
            with scheduler.announce():  # the three share one batch
                done = [scheduler.submit(j) for j in jobs]
            [future.result(timeout=60) for future in done]
            after = runner.stats().feeds
            assert after.passes == feeds.passes + 1 and after.seconds > feeds.seconds  # fed apart, and timed
            assert runner.context_in_verify == in_verify
            scheduler.stop()
        for j, e, c, kv in zip(jobs, expected, contexts, slots):
            assert j.emitted == e
            assert kv.length == len(c) + 5


def test_prompts_sent_with_their_first_verify_are_counted_as_context(target):
    """Two new prompts of one length share a pass (nothing to save by feeding them apart): the
    tokens computed for them beyond each session's last token are counted, so the bench can
    tell prompt work from decoding; a pass of drafts alone counts none."""
    runner, target_alone = target
    contexts = [[1] + [20 + i for i in range(9)], [1] + [200 + i for i in range(9)]]
    expected = [greedy(target_alone, c, 4) for c in contexts]
    slots = [runner.new_kv(), runner.new_kv()]
    counted = runner.context_in_verify
    runner.verify_batch([job(runner, kv, c, e[:3]) for kv, c, e in zip(slots, contexts, expected)])
    assert runner.context_in_verify - counted == 2 * (10 + 3) - 2 * (1 + 3)
    assert [kv.length for kv in slots] == [len(c) + 3 for c in contexts]
    contexts = [c + e for c, e in zip(contexts, expected)]
    after = [greedy(target_alone, c, 3) for c in contexts]
    counted = runner.context_in_verify
    steady = [job(runner, kv, c, a[:2]) for kv, c, a in zip(slots, contexts, after)]
    runner.verify_batch(steady)
    assert runner.context_in_verify == counted
    assert [j.emitted for j in steady] == after


def test_batched_rounds_decode_exactly_like_the_target_alone(target):
    """Several sessions decode 30 tokens each through batched verifies with perfect drafts."""
    runner, target_alone = target
    expected = [greedy(target_alone, c, 30) for c in CONTEXTS]
    contexts = [list(c) for c in CONTEXTS]
    slots = [prefilled(runner, c) for c in contexts]
    generated = [[] for _ in contexts]
    round_number = 0
    while min(len(g) for g in generated) < 30:
        jobs = []
        for i, (context, kv) in enumerate(zip(contexts, slots)):
            # Perfect drafts of varying length, with one wrong token now and then.
            want = expected[i][len(generated[i]) : len(generated[i]) + 1 + (i + round_number) % 4]
            draft = list(want)
            if round_number % 3 == i % 3 and draft:
                draft[-1] = (draft[-1] + 1) % 512
            jobs.append(job(runner, kv, context, draft))
        runner.verify_batch(jobs)
        for i, j in enumerate(jobs):
            contexts[i].extend(j.emitted)
            generated[i].extend(j.emitted)
        round_number += 1
    for g, e in zip(generated, expected):
        assert g[:30] == e


def test_tree_picks_the_matching_branch_and_compacts_the_cache(target):
    runner, target_alone = target
    context = CONTEXTS[1]
    truth = greedy(target_alone, context, 4)
    wrong = [(t + 3) % 512 for t in truth]
    # root -> wrong0 ; root -> truth0 -> wrong1 ; truth0 -> truth1 -> truth2 ; truth1 -> wrong2
    tokens = [wrong[0], truth[0], wrong[1], truth[1], truth[2], wrong[2]]
    parents = [-1, -1, 1, 1, 3, 3]
    tree = job(runner, prefilled(runner, context), context, tokens, parents)
    runner.verify_batch([tree])
    assert tree.path == [1, 3, 4]
    assert tree.emitted == truth[:4]  # three accepted, then the bonus token
    chain = job(runner, prefilled(runner, context), context, truth[:3])
    runner.verify_batch([chain])
    assert chain.emitted == tree.emitted and tree.kv.length == chain.kv.length
    for layer in range(len(runner.layer_types)):
        torch.testing.assert_close(
            stored_kv(runner, tree.kv, layer), stored_kv(runner, chain.kv, layer), atol=1e-4, rtol=1e-4
        )
    # The compacted cache decodes on exactly like the target alone.
    next_context = context + tree.emitted
    follow = job(runner, tree.kv, next_context, greedy(target_alone, next_context, 3))
    runner.verify_batch([follow])
    assert follow.emitted == greedy(target_alone, next_context, 4)


def test_tree_with_no_accepted_node_emits_the_target_token(target):
    runner, target_alone = target
    context = CONTEXTS[0]
    truth = greedy(target_alone, context, 1)
    tokens = [(truth[0] + 1) % 512, (truth[0] + 2) % 512, 9]
    tree = job(runner, prefilled(runner, context), context, tokens, [-1, -1, 0])
    runner.verify_batch([tree])
    assert tree.path == [] and tree.emitted == truth
    assert tree.kv.length == len(context)  # the bonus token stays pending


def test_sampled_tree_verify_equals_target_sampling(target):
    runner, target_alone = target
    context = CONTEXTS[2]
    sampled = target_alone.decode(context, 3, temperature=1.0, seed=9)
    tokens = [(sampled[0] + 5) % 512, sampled[0], sampled[1], (sampled[1] + 1) % 512]
    tree = job(runner, prefilled(runner, context), context, tokens, [-1, -1, 1, 1], temperature=1.0, seed=9)
    runner.verify_batch([tree])
    assert tree.emitted == sampled


def test_a_batch_of_greedy_and_sampled_rows_decodes_each_like_the_target_alone(target):
    """Greedy rows read the batch's one argmax; a sampled row in the same pass draws its own."""
    runner, target_alone = target
    greedy_context, sampled_context = CONTEXTS[0], CONTEXTS[2]
    expected_greedy = greedy(target_alone, greedy_context, 4)
    expected_sampled = target_alone.decode(sampled_context, 3, temperature=1.0, seed=9)
    greedy_job = job(runner, prefilled(runner, greedy_context), greedy_context, expected_greedy[:3])
    sampled_job = job(
        runner, prefilled(runner, sampled_context), sampled_context, expected_sampled[:2], temperature=1.0, seed=9
    )
    runner.verify_batch([greedy_job, sampled_job])
    assert greedy_job.emitted == expected_greedy
    assert sampled_job.emitted == expected_sampled


def test_warm_up_gives_its_slots_back_and_leaves_no_trace(target):
    """A GPU hub runs every batch and draft size once at start; afterwards the pool, the tallies
    and what sessions decode are as if it had not."""
    runner, target_alone = target
    used = runner.pool.used_bytes
    runner.warm_up(max_batch=3, max_draft=5)
    assert runner.busy_seconds == 0.0 and runner.verify_passes == {} and runner.feeds == PassTally()
    assert runner.pool.used_bytes == used and runner.pass_costs.fixed_s() is None
    context = CONTEXTS[2]
    expected = greedy(target_alone, context, 4)
    single = job(runner, prefilled(runner, context), context, expected[:3])
    runner.verify_batch([single])
    assert single.emitted == expected
    pair = [job(runner, prefilled(runner, c), c, [5, 6, 7]) for c in CONTEXTS[:2]]
    runner.verify_batch(pair)  # a second pass size: the fixed part can be told apart
    assert runner.pass_costs.fixed_s() >= 0.0


def test_the_projection_computes_only_the_rows_the_acceptance_rule_reads_when_walking(target, projection):
    """A tree whose every first-level node is rejected: walking level by level projects its root
    row alone; computing every node at once projects all of them. The tokens are the same."""
    runner, target_alone = target
    context = CONTEXTS[0]
    truth = greedy(target_alone, context, 3)
    tokens = [(truth[0] + 1) % 512, truth[1], truth[2], (truth[0] + 2) % 512, 9]  # root -> {0 -> 1 -> 2, 3 -> 4}
    before = runner.walk.projected_rows
    tree = job(runner, prefilled(runner, context), context, tokens, [-1, 0, 1, -1, 3])
    runner.verify_batch([tree])
    assert tree.emitted == truth[:1]
    assert runner.walk.projected_rows - before == (1 if projection == "levels" else 1 + len(tokens))
    chain = job(runner, prefilled(runner, context), context, truth[:2] + [(truth[2] + 1) % 512])
    before = runner.walk.projected_rows
    runner.verify_batch([chain])  # two accepted, the third rejected: three rows are read
    assert chain.emitted == truth[:3]
    assert runner.walk.projected_rows - before == (3 if projection == "levels" else 4)


def test_a_draft_shape_lists_each_nodes_children_depth_and_everything_under_it():
    """`draft_shape`, which the projection's walk reads, against the tree's definition: a node is under
    another when that other is on its way up to the root."""
    rng = random.Random(5)
    for _ in range(50):
        parents = [rng.randrange(-1, i) for i in range(rng.randrange(0, 12))]
        shape = draft_shape(tuple(parents))

        def ancestors(node, parents=parents):
            while node >= 0:
                node = parents[node]
                yield node

        for node in range(-1, len(parents)):
            under = {d for d in range(len(parents)) if node in ancestors(d)}
            assert sorted(shape.below(node)) == sorted(under)
            assert list(shape.kids[node + 1]) == [d for d, p in enumerate(parents) if p == node]
            assert shape.under(node) == Counter(shape.depths[d + 1] for d in under)
        assert list(shape.depths[1:]) == [1 + sum(1 for a in ancestors(d) if a >= 0) for d in range(len(parents))]


def test_a_pass_row_shape_is_kept_for_the_most_recent_shapes_and_matches_a_fresh_one(target):
    """`PassLayout.rows` keeps the last ROW_SHAPES_KEPT shapes; a kept shape is what building it anew gives."""
    runner, _ = target
    runner.layout.row_shapes.cache_clear()
    tree = [[-1, 0, 0, 1], [-1, 0, 1]]  # a tree and a chain, padded to width 4
    first = runner.layout.rows(2, 4, tree)
    for n in range(1, ROW_SHAPES_KEPT + 1):  # as many chains again: the tree's shape is the oldest, dropped
        runner.layout.rows(1, n, [list(range(-1, n - 1))])
    assert runner.layout.row_shapes.cache_info().currsize == ROW_SHAPES_KEPT
    again = runner.layout.rows(2, 4, tree)
    assert again is not first
    for a, b in zip(vars(first).values(), vars(again).values()):
        assert torch.equal(a, b)
    assert again.depths.tolist() == [[0, 1, 1, 2], [0, 1, 2, 0]] and again.sources.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert runner.layout.rows(2, 4, tree) is again


def test_a_tree_whose_rejected_nodes_cross_a_block_boundary_keeps_its_path_and_gives_blocks_back(target):
    """14 tokens stored; a 13-node tree fills positions 14..26, past the first block. Its accepted
    path (the last nodes written, in the second block) moves down across the boundary, and the
    blocks past what the session keeps go back to the pool."""
    runner, target_alone = target
    context = [1] + [(5 * i) % 400 + 30 for i in range(14)]  # 15 tokens: 14 stored, one pending
    truth = greedy(target_alone, context, 4)
    wrong = [[(t + k) % 512 for t in truth] for k in (3, 5, 7)]
    # Three wrong chains of three (nodes 0..8) hang off the root, then the truth's chain (9..11)
    # and a wrong leaf under its first node (12).
    tokens = [*wrong[0][:3], *wrong[1][:3], *wrong[2][:3], *truth[:3], wrong[0][1]]
    parents = [-1, 0, 1, -1, 3, 4, -1, 6, 7, -1, 9, 10, 9]
    kv = prefilled(runner, context)
    assert len(kv.blocks) == 1
    free = runner.pool.free_blocks
    tree = job(runner, kv, context, tokens, parents)
    runner.verify_batch([tree])
    assert tree.path == [9, 10, 11] and tree.emitted == truth
    assert kv.length == len(context) + 3 and len(kv.blocks) == blocks_for(kv.length) == 2
    assert runner.pool.free_blocks == free - 1
    chain = job(runner, prefilled(runner, context), context, truth[:3])
    runner.verify_batch([chain])
    for layer in range(len(runner.layer_types)):
        torch.testing.assert_close(
            stored_kv(runner, kv, layer), stored_kv(runner, chain.kv, layer), atol=1e-4, rtol=1e-4
        )
    next_context = context + tree.emitted
    follow = job(runner, kv, next_context, greedy(target_alone, next_context, 3))
    runner.verify_batch([follow])
    assert follow.emitted == greedy(target_alone, next_context, 4)


def test_contexts_of_several_blocks_decode_like_the_target_alone(target):
    """Contexts of 70 and 100 tokens (past several blocks, and the Gemma target's window of 8
    many times over) decode with drafts, batched, exactly like the target alone."""
    runner, target_alone = target
    contexts = [[1] + [(7 * i) % 450 + 20 for i in range(69)], [1] + [(11 * i) % 450 + 20 for i in range(99)]]
    expected = [greedy(target_alone, c, 12) for c in contexts]
    slots = [prefilled(runner, c) for c in contexts]
    generated: list[list[int]] = [[], []]
    while min(len(g) for g in generated) < 12:
        jobs = [
            job(runner, kv, c + g, (e[len(g) : len(g) + 5] + [3])[:5])
            for kv, c, g, e in zip(slots, contexts, generated, expected)
        ]
        runner.verify_batch(jobs)
        for g, j in zip(generated, jobs):
            g.extend(j.emitted)
    assert [g[:12] for g in generated] == expected
    assert [len(kv.blocks) for kv in slots] == [blocks_for(kv.length) for kv in slots]


def test_a_session_that_finds_no_free_block_is_refused_and_left_as_it_was(tiny):
    """A pool whose every block is taken: a verify that needs one more is refused with
    KVMemoryFull before any pass (the session's length and blocks unchanged); once blocks come
    back, the same verify gives the target's own tokens."""
    runner = ModelRunner(HubSettings(model=str(tiny.hf_dir), kv_memory_gib=0.0005, attention=ATTENTION))
    target_alone = plain_target(tiny.hf_dir)
    context = [1] + [20 + i for i in range(14)]  # 14 stored: one more draft token crosses into a second block
    kv = prefilled(runner, context)
    hog = runner.new_kv()
    assert runner.reserve(hog, runner.pool.free_blocks * BLOCK_TOKENS) and runner.pool.free_blocks == 0
    assert runner.new_kv() is None  # no block free: no new session either
    expected = greedy(target_alone, context, 4)
    blocked = job(runner, kv, context, expected[:3])
    with pytest.raises(KVMemoryFull, match="KV memory is full"):
        runner.verify_batch([blocked])
    assert (kv.length, len(kv.blocks)) == (len(context) - 1, 1)
    runner.release(hog)
    retried = job(runner, kv, context, expected[:3])
    runner.verify_batch([retried])
    assert retried.emitted == expected


def test_a_shared_prefix_followed_by_different_tails_decodes_like_the_target_alone(target):
    """Sessions of one scope that open with the same 40 tokens: the later ones take its two full
    blocks from the pool (referenced, not computed) and compute only their own tails; another
    scope, and a session that shares nothing, compute it all. Every reply is the target's own."""
    runner, target_alone = target
    scope_a, scope_b = f"acct_a-{uuid.uuid4()}", f"acct_b-{uuid.uuid4()}"  # this run's: the module's runner caches
    prefix = [1] + [(13 * i) % 450 + 20 for i in range(39)]
    contexts = [prefix + [100 + k, 200 + k, 300 + k] for k in range(3)]
    hits, reused = runner.pool.tally.prefix_hits, runner.pool.tally.tokens_reused
    first = runner.new_kv(scope=scope_a)
    runner.prefill(first, contexts[0])
    assert runner.pool.tally.prefix_hits == hits  # nothing to share yet
    second, other_account, unshared = runner.new_kv(scope=scope_a), runner.new_kv(scope=scope_b), runner.new_kv()
    for kv, context in zip((second, other_account, unshared), contexts[1:] + contexts[2:]):
        runner.prefill(kv, context)
    assert runner.pool.tally.prefix_hits - hits == 2 and runner.pool.tally.tokens_reused - reused == 32
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert not set(other_account.blocks) & set(first.blocks) and not set(unshared.blocks) & set(first.blocks)
    jobs = [job(runner, kv, c, []) for kv, c in zip((first, second, other_account), contexts)]
    runner.verify_batch(jobs)
    assert [j.emitted for j in jobs] == [greedy(target_alone, c, 1) for c in contexts]
    # A new session of the scope brings the prefix in its first verify: shared there too.
    third = runner.new_kv(scope=scope_a)
    tail = contexts[2] + [77]
    first_verify = job(runner, third, tail, greedy(target_alone, tail, 2))
    runner.verify_batch([first_verify])
    assert third.blocks[:2] == first.blocks[:2]
    assert first_verify.emitted == greedy(target_alone, tail, 3)


def test_a_prefix_reclaimed_from_the_cache_mid_conversation_is_computed_again(tiny):
    """A session closes; its named blocks stay cached; a new session of the same scope takes its
    prefix from the cache. Then memory runs short: the cached blocks are reclaimed for other
    contents, and a session resuming the same conversation computes it again, with the same tokens."""
    runner = ModelRunner(HubSettings(model=str(tiny.hf_dir), kv_memory_gib=0.0005, attention=ATTENTION))
    target_alone = plain_target(tiny.hf_dir)
    context = [1] + [(17 * i) % 450 + 20 for i in range(49)]  # three full blocks stored
    kv = runner.new_kv(scope="acct_a")
    runner.prefill(kv, context)
    runner.release(kv)
    assert runner.pool.cached_blocks == 3
    again = runner.new_kv(scope="acct_a")
    runner.prefill(again, context)
    assert runner.pool.tally.prefix_hits == 3 and runner.pool.cached_blocks == 0
    runner.release(again)
    hog = runner.new_kv()
    assert runner.reserve(hog, runner.pool.free_blocks * BLOCK_TOKENS)  # takes the cached blocks too
    assert runner.pool.cached_blocks == 0 and runner.pool.tally.reclaimed == 3
    runner.release(hog)
    resumed = runner.new_kv(scope="acct_a")
    runner.prefill(resumed, context)
    assert runner.pool.tally.prefix_hits == 3  # nothing left to share: computed again
    expected = greedy(target_alone, context, 4)
    resumed_job = job(runner, resumed, context, expected[:3])
    runner.verify_batch([resumed_job])
    assert resumed_job.emitted == expected
