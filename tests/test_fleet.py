"""The fleet simulation: the hub's own scheduler and placement in virtual time, measured pass costs."""

from __future__ import annotations

import pytest

from specedge_bench.fleet import PAIRS, FleetConfig, Pair, PassCosts, acceptance_for, simulate

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
