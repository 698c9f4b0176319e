"""`specedge bench` prints llama-bench style rows, and hub rows when a hub is given."""

from __future__ import annotations

import json

from specedge_cli.drafting.draft_tree import DraftShape
from specedge_cli.drafting.engine import DraftEngine
from tests.conftest import run_specedge

ROW_KEYS = {"model", "size", "params", "backend", "threads", "test", "avg_ts", "stddev_ts"}


def test_local_rows_as_json(tiny):
    result = run_specedge(
        "bench", "-m", str(tiny.gguf_f32), "-r", "2", "--n-prompt", "32", "-n", "16", "-t", "1", "-o", "json"
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["test"] for row in rows] == ["pp32", "tg16"]
    for row in rows:
        assert set(row) >= ROW_KEYS and row["avg_ts"] > 0 and row["threads"] == 1
        assert row["model"] == tiny.gguf_f32.name and len(row["samples_ts"]) == 2
    assert "bench: tg16" in result.stderr  # what it does meanwhile, on stderr


def test_compare_raw_measures_both_side_by_side(tiny):
    result = run_specedge(
        "bench",
        "-m",
        str(tiny.gguf_f32),
        "-r",
        "2",
        "--n-prompt",
        "0",
        "-n",
        "100",
        "-t",
        "1",
        "--compare-raw",
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stderr
    rows = {row["test"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"tg100", "tg100-raw"}
    assert rows["tg100"]["vs_raw"] == rows["tg100"]["avg_ts"] / rows["tg100-raw"]["avg_ts"]


def test_a_chain_stops_at_the_node_budget(tiny):
    """127 llama_decode calls for 64 tokens was the chain growing past what it could send."""
    engine = DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=1, max_tree_nodes=16)
    tree = engine.plan([engine.vocab.bos_token_id], DraftShape(depth=40, budget=40))
    assert len(tree.wire_tokens) == 16
    assert tree.decodes <= 16 and tree.levels == 16


def test_hub_rows_show_round_trip_edge_and_server_only_speed(tiny, hub):
    result = run_specedge(
        "bench",
        "-m",
        str(tiny.gguf_f32),
        "-r",
        "1",
        "--n-prompt",
        "0",
        "-n",
        "8",
        "--hub",
        hub.url,
        "--hub-tokens",
        "16",
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stderr
    rows = {row["test"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"tg8", "rtt", "hub-tg16", "hub-only-tg16"}
    assert rows["rtt"]["rtt_ms_p50"] <= rows["rtt"]["rtt_ms_p95"] and "avg_ts" not in rows["rtt"]
    assert rows["hub-tg16"]["tokens_per_verify"] > 1 and 0 < rows["hub-tg16"]["acceptance"] <= 1
    assert rows["hub-only-tg16"]["avg_ts"] > 0
    markdown = run_specedge(
        "bench", "-m", str(tiny.gguf_f32), "-r", "1", "--n-prompt", "0", "-n", "8", "--hub", hub.url
    )
    header, _, *lines = markdown.stdout.splitlines()
    assert header.split(" | ")[6:8] == ["t/s", "rtt ms"]
    rtt = next(line for line in lines if "| rtt |" in line).split(" | ")
    assert rtt[6] == "-" and "p95" in rtt[7]  # the round trip is in its own column, not under t/s


def test_markdown_and_csv_tables(tiny):
    markdown = run_specedge("bench", "-m", str(tiny.gguf_f32), "-r", "1", "--n-prompt", "8", "-n", "8")
    assert markdown.returncode == 0 and "| model | size | params |" in markdown.stdout and "tg8" in markdown.stdout
    table = run_specedge("bench", "-m", str(tiny.gguf_f32), "-r", "1", "--n-prompt", "8", "-n", "8", "-o", "csv")
    assert table.stdout.splitlines()[0].startswith("model,") and "avg_ts,stddev_ts" in table.stdout.splitlines()[0]
    assert len(table.stdout.splitlines()) == 3


def test_p_means_prompt_in_chat_and_nothing_in_bench(tiny):
    refused = run_specedge("bench", "-m", str(tiny.gguf_f32), "-p", "8")
    assert refused.returncode == 2 and "No such option: -p" in refused.stderr
