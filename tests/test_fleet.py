"""The fleet simulation: the hub's own scheduler and placement in virtual time, measured pass costs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest

from hub_server.scheduler import MIN_PROMPT_CHUNK
from specedge_bench.fleet import FEED_CHUNK, PAIRS, FleetConfig, Pair, PassCosts, acceptance_for, run, simulate

# Every draft accepted (9 tokens a verify at 8 drafted): each step's time is known exactly.
SURE = Pair("sure", ((1, 1, 20.0), (1, 9, 20.8), (8, 8, 21.4), (8, 72, 27.8)), 9.0, 8, "made up")
QUIET = FleetConfig(workers=1, users=1, max_tokens=64, replies=2, think_s=0.5, duration_s=20, warmup_s=2)


def test_pass_costs_fit_the_measured_passes():
    costs = SURE.costs  # 20 ms fixed, 0.1 ms a session, 0.1 ms a token
    assert costs.seconds(1, 9) == pytest.approx(0.0208, abs=1e-5)
    assert costs.per_token_s == pytest.approx(0.0001, abs=1e-6)
    gemma = PAIRS["gemma"].costs
    for sessions, tokens, ms in PAIRS["gemma"].passes:  # a plane through them, within 15%
        assert gemma.seconds(sessions, tokens) * 1000 == pytest.approx(ms, rel=0.15)
    assert PassCosts.fit([(1, 1, 10.0), (2, 2, 9.0), (4, 4, 8.0)]).per_token_s == 0.0  # never below zero


def test_a_tensor_parallel_workers_pass_is_modelled_from_its_gpus_and_paid_by_each_of_them():
    pair = PAIRS["llama70b-tp4"]
    costs = pair.costs  # 141 GB of weights over 4 GPUs at 2.35 TB/s, 160 all-reduces of 20 us
    assert costs.fixed_s == pytest.approx(0.0150 + 0.0032, rel=0.01)
    assert costs.per_token_s == pytest.approx(89e-6 + 11e-6, rel=0.02)
    halved = replace(pair.modelled, devices=2).costs  # each GPU reads and computes twice as much
    assert halved.fixed_s - 0.0032 == pytest.approx(2 * (costs.fixed_s - 0.0032), rel=1e-6)
    four, one = simulate(QUIET, pair), simulate(QUIET, replace(pair, devices=1))
    assert (four["gpus"], one["gpus"]) == (4, 1) and four["emitted_tokens"] == one["emitted_tokens"]
    assert four["server_usd_per_million_tokens_busy"] == pytest.approx(4 * one["server_usd_per_million_tokens_busy"])
    assert four["tokens_per_busy_gpu_s"] == pytest.approx(one["tokens_per_busy_gpu_s"] / 4)


def test_acceptance_gives_the_measured_tokens_per_verify():
    a = acceptance_for(5.05, 8)
    assert (1 - a**9) / (1 - a) == pytest.approx(5.05, rel=1e-6)


def test_one_specedge_user_waits_for_its_draft_the_round_trip_and_one_pass_per_step():
    result = simulate(QUIET, SURE)
    step_s = 8 / 200 + 0.014 + SURE.costs.seconds(1, 9)  # draft, round trip, a pass of 9 tokens
    assert result["itl_ms_p50"] == pytest.approx(1000 * step_s / 9, rel=1e-6)
    assert result["sessions_per_pass"] == 1.0 and result["emitted_tokens"] > 0
    assert result["edge_busy_s"] > 0


def test_one_server_only_user_gets_a_token_each_pass():
    result = simulate(FleetConfig(**{**QUIET.__dict__, "mode": "autoregressive"}), SURE)
    assert result["itl_ms_p50"] == pytest.approx(1000 * SURE.costs.seconds(1, 1), rel=1e-6)
    assert result["edge_busy_s"] == 0


def test_placement_spreads_users_evenly_and_the_scheduler_batches_them():
    config = FleetConfig(workers=4, users=64, max_tokens=64, think_s=0.5, away_s=0.01, duration_s=12, warmup_s=4)
    result = simulate(config, PAIRS["gemma"])
    assert result["sessions_per_worker_mean"] == pytest.approx(16, rel=0.1)
    assert result["worker_tokens_max_over_mean"] < 1.3
    assert result["sessions_per_pass"] > 1.5  # users share passes on their worker
    assert result["refused_arrivals"] == 0


def test_the_fleets_cost_splits_into_server_and_edge_time_at_their_prices():
    result = simulate(QUIET, SURE)
    counted_h = (QUIET.duration_s - QUIET.warmup_s) / 3600
    server = result["busy_fraction"] * counted_h * 4.05 * 1e6 / result["emitted_tokens"]
    edge = result["edge_busy_s"] / 3600 * 0.35 * 1e6 / result["emitted_tokens"]
    assert result["server_usd_per_million_tokens_busy"] == pytest.approx(server, rel=1e-6)
    assert result["edge_usd_per_million_tokens"] == pytest.approx(edge, rel=1e-6)
    assert result["usd_per_million_tokens_busy"] == pytest.approx(server + edge, rel=1e-6)
    # Rented: the worker is paid for all along, busy or not.
    assert result["usd_per_million_tokens_rented"] == pytest.approx(
        counted_h * 4.05 * 1e6 / result["emitted_tokens"] + edge, rel=1e-6
    )


def test_a_long_prompt_goes_in_chunks_beside_the_other_users_verifies_as_the_hub_schedules_it():
    """Four users on one worker; now and then a turn brings a 3,000-token document, which the hub
    feeds as a prompt. Its scheduler carves each step's chunk from the budget (--max-pass-tokens
    256 less the step's verify tokens) after the step's verify pass: the document goes in over
    many steps, verifies share steps with its chunks, and no verify waits for more than a step,
    where the whole prefill takes most of a second."""
    config = FleetConfig(workers=1, users=4, max_tokens=64, replies=3, think_s=0.5, duration_s=30, warmup_s=2)
    config = FleetConfig(**{**config.__dict__, "long_prompt_share": 0.2, "max_pass_tokens": 256})
    worker = run(config, SURE).workers[0]
    chunks = defaultdict(list)  # prompt -> its chunks' sizes
    for step in worker.steps:
        if step.chunks:
            assert sum(size for _, size in step.chunks) <= max(MIN_PROMPT_CHUNK, 256 - step.verify_tokens)
        for prompt, size in step.chunks:
            chunks[prompt].append(size)
    done = [sizes for prompt, sizes in chunks.items() if prompt.future.done()]
    assert len(done) >= 3 and len(chunks) <= len(done) + 1  # the last may be going in as the run ends
    assert all(sum(sizes) == 3000 and len(sizes) >= 3000 // 256 for sizes in done)
    assert sum(1 for step in worker.steps if step.sessions and step.chunks) >= 10
    whole_prefill = sum(SURE.costs.seconds(1, 128) for _ in range(3000 // 128)) + SURE.costs.seconds(1, 3000 % 128)
    longest_step = max(step.seconds for step in worker.steps)
    assert max(worker.verify_waits) <= longest_step < whole_prefill / 5


def test_a_turns_new_text_rides_in_its_verify_or_goes_apart_as_the_hub_composes_it():
    """A turn's 40 new tokens beside other users' drafts: on a CPU (a pass costs about two tokens
    beyond its own) or past the widest row a GPU's compiled passes are built for, the scheduler
    feeds them in a pass of their own first; within it, a GPU pass costs too much to take them
    out, so they ride in the padded pass."""
    base = FleetConfig(workers=1, users=4, prompt_tokens=40, max_tokens=32, think_s=0.2, duration_s=10, warmup_s=1)

    def fed_apart(**settings: object) -> list[int]:
        steps = run(FleetConfig(**{**base.__dict__, **settings}), SURE).workers[0].steps
        assert not any(step.chunks for step in steps)  # 40 tokens are no prompt of their own
        return [tokens for step in steps for tokens in step.fed_apart]

    assert set(fed_apart(device="cpu", widest_row=128)) == {40}
    assert set(fed_apart(device="cuda", widest_row=9)) == {40}  # compiled for rows of 1 + 8 tokens
    assert fed_apart(device="cuda") == []  # compiled for rows of 1 + 64


def test_the_simulation_feeds_a_context_in_the_runners_passes():
    from hub_server.engine.runner import FEED_CHUNK as RUNNERS

    assert FEED_CHUNK == RUNNERS
