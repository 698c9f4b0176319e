"""`hub_server bench` runs all three modes side by side against a real hub and reports figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_bench_reports_every_mode_ratios_bound_and_a_plot(tiny, tmp_path):
    plot = tmp_path / "bench.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hub_server",
            "bench",
            "--model",
            str(tiny.hf_dir),
            "--draft",
            str(tiny.gguf_q8),
            "--clients",
            "2",
            "--rtt-ms",
            "4",
            "--max-tokens",
            "12",
            "--prompts",
            "2",
            "--plot",
            str(plot),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["modes"]) == {"specedge", "server_only_spec", "autoregressive"}
    # Every user of every mode received the target's own greedy reply to each prompt.
    assert all(mode["lossless"] is True for mode in report["modes"].values())
    emitted = {mode["emitted_tokens"] for mode in report["modes"].values()}
    assert len(emitted) == 1 and 0 < emitted.pop() <= 2 * 2 * 12
    for mode in report["modes"].values():
        for key in (
            "server_throughput",
            "wall_throughput",
            "tokens_per_verify",
            "itl_ms_mean",
            "itl_ms_p95",
            "ttft_ms_mean",
            "hub_busy_fraction",
        ):
            assert mode[key] > 0, key
    assert report["modes"]["autoregressive"]["tokens_per_verify"] == 1.0
    assert report["modes"]["specedge"]["tokens_per_verify"] > 1.0
    assert set(report["ratios"]) == {
        "throughput_vs_autoregressive",
        "throughput_vs_server_only_spec",
        "itl_vs_server_only_spec",
        "cost_efficiency_vs_server_only_spec",
        "cost_efficiency_vs_autoregressive",
    }
    _check_costs(report)
    bound = report["bound"]
    assert bound["throughput_vs_autoregressive"] > 0 and bound["sessions_per_pass"] == 2
    assert bound["measured"].startswith("probe")  # full passes of both kinds, measured directly
    assert bound["one_token_pass_ms"] > 0 and bound["verify_pass_ms"] > 0
    assert bound["share_of_bound"] == pytest.approx(
        bound["decode_throughput_vs_autoregressive"] / bound["throughput_vs_autoregressive"], rel=0.01
    )
    # Its two halves: each mode's decoding against full passes at the probe's cost.
    assert bound["share_of_bound"] == pytest.approx(
        bound["specedge_share_of_full_passes"] / bound["autoregressive_share_of_full_passes"], rel=0.02
    )
    for mode in report["modes"].values():  # prompts, fed apart or inside verifies, are counted apart
        assert 0 <= mode["prefill_in_verify_s"] <= mode["prefill_busy_s"] <= mode["hub_busy_s"]
        assert mode["decode_throughput"] >= mode["server_throughput"]
    # The simulated users draft ahead while a verify is out, like the real client.
    specedge = report["modes"]["specedge"]
    assert specedge["proactive_drafts"] > 0 and 0 <= specedge["proactive_hit_rate"] <= 1
    assert report["config"]["proactive"] is True
    assert report["config"]["clients"] == 2 and report["config"]["rtt_ms"] == 4
    assert report["config"]["edge_tps"] > 0  # measured on the draft model, since no --edge-tps
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_costs(report: dict) -> None:
    """Every mode's cost follows from its own busy seconds at the default prices (the paper's)."""
    assert (report["config"]["server_price_per_hour"], report["config"]["edge_price_per_hour"]) == (4.05, 0.35)
    for name, mode in report["modes"].items():
        cost = mode["cost"]
        assert cost["server_s"] == pytest.approx(mode["hub_busy_s"], abs=1e-3)
        # From the unrounded seconds: a fast run's busy time is a few tens of ms, where the
        # rounded `server_s` is 1% off.
        assert cost["server_usd"] == pytest.approx(mode["hub_busy_s"] * 4.05 / 3600, rel=1e-6)
        assert cost["edge_usd"] == pytest.approx(cost["edge_busy_s"] * 0.35 / 3600, abs=0.0005 * 0.35 / 3600)
        dollars = cost["server_usd"] + cost["edge_usd"]
        assert cost["usd_per_million_tokens"] == pytest.approx(1e6 * dollars / mode["emitted_tokens"], rel=0.01)
        assert cost["tokens_per_dollar"] == pytest.approx(mode["emitted_tokens"] / dollars, rel=0.01)
        # Only SpecEdge users draft on a device of their own; server-only modes use none.
        assert (cost["edge_busy_s"] > 0) == (name == "specedge")
    # Each user's device drafts at most all the time the run took.
    specedge = report["modes"]["specedge"]
    assert specedge["cost"]["edge_busy_s"] <= report["config"]["clients"] * specedge["wall_s"]
    spec_tpd = specedge["cost"]["tokens_per_dollar"]
    sos_tpd = report["modes"]["server_only_spec"]["cost"]["tokens_per_dollar"]
    assert report["ratios"]["cost_efficiency_vs_server_only_spec"] == pytest.approx(spec_tpd / sos_tpd, rel=0.01)


def test_cost_of_a_mode_counts_server_and_edge_time_at_their_prices():
    from specedge_bench.cost import mode_cost

    # One hour of server time at $4.05 and two of edge time at $0.35, for 1,000 tokens.
    cost = mode_cost(1000, server_s=3600, edge_s=7200, server_per_hour=4.05, edge_per_hour=0.35)
    assert cost["server_usd"] == pytest.approx(4.05) and cost["edge_usd"] == pytest.approx(0.70)
    assert cost["usd_per_million_tokens"] == pytest.approx(4750.0)
    assert cost["tokens_per_dollar"] == pytest.approx(1000 / 4.75, abs=0.1)
    assert mode_cost(0, 0, 0, 4.05, 0.35)["tokens_per_dollar"] == 0.0


def _active_sessions(hub, user: str) -> float:
    from specedge_bench.metrics import MetricsPage
    from specedge_common.metric_names import ACTIVE_SESSIONS

    with hub.client(user) as client:
        return MetricsPage.parse(client.get("/metrics").text).value(ACTIVE_SESSIONS)


def test_bench_against_a_running_hub_takes_its_token_and_measures_the_bound_through_its_api(tiny, auth_hub, tmp_path):
    command = [
        sys.executable,
        "-m",
        "hub_server",
        "bench",
        "--hub",
        auth_hub.url,
        "--draft",
        str(tiny.gguf_q8),
        "--clients",
        "2",
        "--rtt-ms",
        "4",
        "--max-tokens",
        "12",
        "--prompts",
        "2",
        "--modes",
        "specedge,autoregressive",
        "--plot",
        str(tmp_path / "bench.png"),
        "--json",
    ]
    environment = {key: value for key, value in os.environ.items() if key != "SPECEDGE_TOKEN"}
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    assert refused.returncode == 1
    assert "needs an API token: pass --token or set SPECEDGE_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr

    open_before = _active_sessions(auth_hub, "ops")
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, "SPECEDGE_TOKEN": auth_hub.tokens["ops"]},  # an operator's: the bench reads /metrics
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert all(mode["lossless"] is True for mode in report["modes"].values())
    bound = report["bound"]
    # Passes of both kinds over the two sessions, made through the API, not read off the runs.
    assert bound["measured"].startswith("through the hub's API: passes of") and bound["sessions_per_pass"] == 2
    assert bound["one_token_pass_ms"] > 0 and bound["verify_pass_ms"] > 0 and bound["throughput_vs_autoregressive"] > 0
    assert _active_sessions(auth_hub, "ops") == open_before  # every session it opened, it closed

    revoked = subprocess.run(
        [*command[:-1], "--token", "not-a-token", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert revoked.returncode == 1 and "refused this token (401)" in revoked.stderr
    assert "Traceback" not in revoked.stderr


def test_bench_refuses_a_draft_of_another_vocabulary_and_a_mode_the_hub_cannot_serve(tiny, hub, tmp_path):
    from tests.test_cli_chat import _gemma_path

    def bench(draft, *extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hub_server",
                "bench",
                "--hub",
                hub.url,
                "--draft",
                str(draft),
                "--clients",
                "1",
                "--max-tokens",
                "4",
                "--prompts",
                "1",
                "--plot",
                str(tmp_path / "b.png"),
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )

    other = bench(_gemma_path(), "--modes", "specedge,autoregressive")
    assert other.returncode == 1 and "another vocabulary than the hub's target" in other.stderr
    assert "Traceback" not in other.stderr
    # This hub was started without --draft: it has no speculative mode of its own.
    no_draft = bench(tiny.gguf_q8)
    assert no_draft.returncode == 1 and "pass --modes specedge,autoregressive" in no_draft.stderr
    assert "Traceback" not in no_draft.stderr
    typo = bench(tiny.gguf_q8, "--modes", "specedg")  # would have run autoregressive under that name
    assert typo.returncode == 2 and "unknown mode specedg" in typo.stderr


def test_emulated_edges_give_the_draft_models_own_tokens_at_the_edge_speed(tiny):
    from hub_server.engine.drafter import HubDrafter
    from specedge_bench.edges import EmulatedEdges

    reference = HubDrafter(tiny.gguf_q8, n_threads=1)
    edges = EmulatedEdges(HubDrafter(tiny.gguf_q8, n_threads=1), tokens_per_second=200.0)
    context = reference.tokenize("def fibonacci(n):")
    edges.prepare([context], draft_len=4)
    assert edges.steps == 4 and edges.tokens_per_second == 200.0
    started = time.perf_counter()
    draft = edges.draft(context, 6)
    waited = time.perf_counter() - started
    assert draft == reference.draft("fresh", context, 6)
    assert edges.steps == 6  # the first four came from the store, two were drafted now
    assert waited >= 6 / 200.0  # as long as a 200 t/s device takes to draft six tokens
    # A context below an accepted token reuses what was drafted along the way.
    assert edges.draft(context + draft[:2], 4) == draft[2:6] and edges.steps == 6
    # The draft model's own next token: the guess a proactive edge drafts below.
    assert edges.next_token(context + draft[:5]) == draft[5] and edges.steps == 6
    # A draft begun earlier (ahead, while a verify was out) is ready without a further wait: on
    # a 2 t/s device six tokens take 3 s, begun 10 s ago they are ready now (a margin for a busy machine).
    edges.tokens_per_second = 2.0
    started = time.perf_counter()
    assert edges.draft(context, 6, since=started - 10.0) == draft
    assert time.perf_counter() - started < 1.5


def test_a_simulated_user_sends_its_draft_made_ahead_only_when_the_guessed_outcome_comes_back(tiny):
    from hub_server.engine.drafter import HubDrafter
    from specedge_bench.config import BenchConfig
    from specedge_bench.edges import EmulatedEdges
    from specedge_bench.users import SimulatedUser

    edges = EmulatedEdges(HubDrafter(tiny.gguf_q8, n_threads=1), tokens_per_second=200.0)
    context = HubDrafter(tiny.gguf_q8, n_threads=1).tokenize("def fibonacci(n):")
    draft = edges.draft(context, 4)
    guess = draft + [edges.next_token(context + draft)]  # all accepted, then the draft model's token
    config = BenchConfig("http://unused", tiny.gguf_q8, 1, 0.0, 32, 4, ())
    user = SimulatedUser(0, config, edges, None, frozenset())
    sent = time.perf_counter()
    assert user._drafted_ahead(sent, context, draft, guess, room=20) == sent  # the next draft began at the send
    assert user._drafted_ahead(sent, context, draft, draft[:2] + [7], room=20) is None  # a rejection: draft anew
    other = (guess[-1] + 1) % 512
    assert user._drafted_ahead(sent, context, draft, draft + [other], room=20) is None  # another bonus token
    assert (user.record.drafts_ahead, user.record.ahead_hits) == (3, 1)
    assert user._drafted_ahead(sent, context, draft, guess, room=5) is None  # no round left after the guess
    off = SimulatedUser(
        0, BenchConfig("http://unused", tiny.gguf_q8, 1, 0.0, 32, 4, (), proactive=False), edges, None, frozenset()
    )
    assert off._drafted_ahead(sent, context, draft, guess, room=20) is None and off.record.drafts_ahead == 0


def test_pass_cost_at_a_batch_size_follows_the_passes_seen():
    from specedge_bench.bound import pass_ms_at

    # Passes of 1 and 3 sessions cost 100 and 300 ms: a full pass of 8 costs 800 ms.
    assert pass_ms_at({1: [10, 100.0], 3: [10, 300.0]}, 8) == 800.0
    # The line is weighted by how often each size ran.
    assert pass_ms_at({2: [1, 200.0], 4: [3, 400.0]}, 4) == 400.0
    # One size seen: its mean, whatever is asked.
    assert pass_ms_at({4: [5, 250.0]}, 8) == 250.0
    assert pass_ms_at({}, 8) == 0.0


def test_the_metrics_reader_sums_over_workers_and_reads_what_grew():
    from specedge_bench.metrics import MetricsPage, hub_busy_s, pass_ms_by_sessions
    from specedge_common import metric_names as names

    def page(busy: float, passes: int) -> MetricsPage:
        return MetricsPage.parse(
            "# TYPE specedge_device_busy_seconds_total counter\n"
            f'specedge_device_busy_seconds_total{{worker="0"}} {busy}\n'
            f'specedge_device_busy_seconds_total{{worker="1"}} {2 * busy}\n'
            "# TYPE specedge_verify_passes_total counter\n"
            f'specedge_verify_passes_total{{sessions="4",worker="0"}} {passes}\n'
            f'specedge_verify_passes_total{{sessions="4",worker="1"}} {passes}\n'
            "# TYPE specedge_verify_pass_seconds_total counter\n"
            f'specedge_verify_pass_seconds_total{{sessions="4",worker="0"}} {busy}\n'
            f'specedge_verify_pass_seconds_total{{sessions="4",worker="1"}} {2 * busy}\n'
            "# TYPE specedge_verify_seconds summary\n"
            f"specedge_verify_seconds_sum {busy}\nspecedge_verify_seconds_count {4 * passes}\n"
        )

    before, after = page(1.0, 10), page(3.0, 30)
    assert after.value(names.DEVICE_BUSY_SECONDS) == 9.0  # both workers
    assert after.value(names.DEVICE_BUSY_SECONDS, worker="1") == 6.0
    assert after.value(names.VERIFY_REQUESTS) == 120 and after.has(names.VERIFY_REQUESTS)
    assert not after.has(names.HUB_DRAFT_SECONDS) and after.value(names.HUB_DRAFT_SECONDS) == 0.0  # an older hub
    grown = after.since(before)
    assert hub_busy_s(grown) == 6.0
    # 40 passes of 4 sessions grew, costing 6 s in all: 150 ms each.
    assert pass_ms_by_sessions(grown) == {4: [40.0, 150.0]}


def test_per_worker_gauges_are_averaged_and_prompt_costs_use_each_workers_own_fit():
    from specedge_bench.config import BenchConfig
    from specedge_bench.metrics import MetricsPage, worker_mean
    from specedge_bench.runs import _figures
    from specedge_common import metric_names as names

    def page(context_tokens: float, busy_s: float, passes: int) -> MetricsPage:
        return MetricsPage.parse(
            "# TYPE specedge_pass_token_seconds gauge\n"
            'specedge_pass_token_seconds{worker="0"} 0.001\nspecedge_pass_token_seconds{worker="1"} 0.003\n'
            "# TYPE specedge_pass_fixed_seconds gauge\n"
            'specedge_pass_fixed_seconds{worker="0"} 0.010\nspecedge_pass_fixed_seconds{worker="1"} 0.030\n'
            "# TYPE specedge_verify_context_tokens_total counter\n"
            f'specedge_verify_context_tokens_total{{worker="0"}} {context_tokens}\n'
            f'specedge_verify_context_tokens_total{{worker="1"}} {2 * context_tokens}\n'
            "# TYPE specedge_device_busy_seconds_total counter\n"
            f'specedge_device_busy_seconds_total{{worker="0"}} {busy_s}\n'
            f'specedge_device_busy_seconds_total{{worker="1"}} {busy_s}\n'
            f"# TYPE specedge_batches_total counter\nspecedge_batches_total {passes}\n"
        )

    before, after = page(0.0, 0.0, 0), page(100.0, 1.0, 10)
    assert worker_mean(after, names.PASS_FIXED_SECONDS) == pytest.approx(0.020)  # not 0.040, their sum
    config = BenchConfig("http://hub", Path("draft.gguf"), 1, 0.0, 8, 4, ())
    figures = _figures(config, [], after, after.since(before), wall=1.0)
    # 100 tokens at worker 0's 1 ms and 200 at worker 1's 3 ms: 0.7 s (a summed gauge would say 1.2 s).
    assert figures["prefill_in_verify_s"] == pytest.approx(0.7)
    assert figures["pass_fixed_ms"] == pytest.approx(20.0)
    # A fit that puts more in the prompts than the passes took leaves each pass its fixed part:
    # 0.5 s of passes, 10 of them at a mean 20 ms fixed.
    short = page(100.0, 0.25, 10)
    assert _figures(config, [], short, short.since(before), wall=1.0)["prefill_in_verify_s"] == pytest.approx(0.3)
    one_worker = MetricsPage.parse("# TYPE specedge_pass_fixed_seconds gauge\nspecedge_pass_fixed_seconds 0.05\n")
    assert worker_mean(one_worker, names.PASS_FIXED_SECONDS) == pytest.approx(0.05)
