"""`specedge bench` prints llama-bench style rows, and hub rows when a hub is given."""

from __future__ import annotations

import json

from tests.conftest import run_specedge

ROW_KEYS = {"model", "size", "params", "backend", "threads", "test", "avg_ts", "stddev_ts"}


def test_local_rows_as_json(tiny):
    result = run_specedge("bench", "-m", str(tiny.gguf_f32), "-r", "2", "-p", "32", "-n", "16", "-t", "1", "-o", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["test"] for row in rows] == ["pp32", "tg16"]
    for row in rows:
        assert set(row) >= ROW_KEYS and row["avg_ts"] > 0 and row["threads"] == 1
        assert row["model"] == tiny.gguf_f32.name and len(row["samples_ts"]) == 2


def test_hub_rows_show_round_trip_edge_and_server_only_speed(tiny, hub):
    result = run_specedge(
        "bench",
        "-m",
        str(tiny.gguf_f32),
        "-r",
        "1",
        "-p",
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
    assert rows["rtt"]["rtt_ms_p50"] <= rows["rtt"]["rtt_ms_p95"]
    assert rows["hub-tg16"]["tokens_per_verify"] > 1 and 0 < rows["hub-tg16"]["acceptance"] <= 1
    assert rows["hub-only-tg16"]["avg_ts"] > 0


def test_markdown_and_csv_tables(tiny):
    markdown = run_specedge("bench", "-m", str(tiny.gguf_f32), "-r", "1", "-p", "8", "-n", "8")
    assert markdown.returncode == 0 and "| model | size | params |" in markdown.stdout and "tg8" in markdown.stdout
    table = run_specedge("bench", "-m", str(tiny.gguf_f32), "-r", "1", "-p", "8", "-n", "8", "-o", "csv")
    assert table.stdout.splitlines()[0].endswith("avg_ts,stddev_ts") and len(table.stdout.splitlines()) == 3
