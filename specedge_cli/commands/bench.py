"""`specedge bench`: how fast this machine drafts, and whether edge assistance pays off.

Like llama-bench: prompt processing (`pp512`) and generation (`tg128`) of the draft model, mean
± std over repetitions. With a hub (--hub, SPECEDGE_HUB or a login) it adds rows for the round
trip to the hub, end-to-end speed through the hub with tokens per verify and acceptance, and the
same prompts decoded by the hub alone in its server-only mode, side by side.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from typing import Annotated

import typer

from specedge_cli import config
from specedge_cli.decoding import Conversation, DecodeSettings
from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import DEFAULT_MODEL, resolve_model
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient

HUB_PROMPTS = ("def quicksort(items):", "Question: Why is the sky blue?\nAnswer:", "The old bridge over the river")


def bench(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Draft model: a .gguf path or a preset name.")
    ] = DEFAULT_MODEL,
    threads: Annotated[int | None, typer.Option("--threads", "-t", min=1, help="llama.cpp threads.")] = None,
    n_prompt: Annotated[
        int, typer.Option("--n-prompt", "-p", min=0, help="Prompt tokens for the pp test (0 skips it).")
    ] = 512,
    n_gen: Annotated[
        int, typer.Option("--n-gen", "-n", min=0, help="Generated tokens for the tg test (0 skips it).")
    ] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Repetitions of each test.")] = 5,
    output: Annotated[str, typer.Option("--output", "-o", help="md, json or csv.")] = "md",
    hub: Annotated[
        str | None, typer.Option(help="Also measure through this hub (default: SPECEDGE_HUB or your login).")
    ] = None,
    hub_tokens: Annotated[int, typer.Option(min=1, help="Tokens per hub prompt.")] = 64,
) -> None:
    """Benchmark drafting speed, and end-to-end speed through a hub."""
    if output not in ("md", "json", "csv"):
        raise typer.BadParameter("use md, json or csv", param_hint="--output")
    resolved = resolve_model(model, config.models_dir())
    engine = DraftEngine(resolved.path, n_ctx=max(1024, n_prompt + n_gen + 16), n_threads=threads)
    base = _model_columns(engine, threads)
    rows = []
    if n_prompt:
        rows.append({**base, "test": f"pp{n_prompt}", **_mean_std(_prompt_speeds(engine, n_prompt, repetitions))})
    if n_gen:
        rows.append({**base, "test": f"tg{n_gen}", **_mean_std(_generation_speeds(engine, n_gen, repetitions))})
    address = config.hub_address(hub)
    if address.url:
        with HubClient(address.url, address.token, insecure=address.insecure) as client:
            rows += _hub_rows(engine, client, base, hub_tokens, repetitions)
    typer.echo(_render(rows, output))


def _model_columns(engine: DraftEngine, threads: int | None) -> dict:
    import llama_cpp

    backend = "GPU" if llama_cpp.llama_supports_gpu_offload() else "CPU"
    return {
        "model": engine.path.name,
        "size": engine.path.stat().st_size,
        "params": int(llama_cpp.llama_model_n_params(engine.llm.model)),
        "backend": backend,
        "threads": engine.n_threads,
    }


def _mean_std(speeds: list[float]) -> dict:
    return {
        "avg_ts": statistics.fmean(speeds),
        "stddev_ts": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
        "samples_ts": speeds,
    }


def _test_tokens(engine: DraftEngine, n: int) -> list[int]:
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (n // 4 + 1))
    return ([engine.bos_token_id] + engine.tokenize(text, add_bos=False))[:n]


def _prompt_speeds(engine: DraftEngine, n: int, repetitions: int) -> list[float]:
    tokens = _test_tokens(engine, n)
    speeds = []
    for _ in range(repetitions + 1):  # the first run warms up and is not counted
        engine.reset()
        started = time.perf_counter()
        engine.evaluate(tokens)
        speeds.append(len(tokens) / (time.perf_counter() - started))
    return speeds[1:]


def _generation_speeds(engine: DraftEngine, n: int, repetitions: int) -> list[float]:
    speeds = []
    for _ in range(repetitions + 1):
        engine.reset()
        started = time.perf_counter()
        drafted = engine.draft([engine.bos_token_id], n)
        speeds.append(len(drafted) / (time.perf_counter() - started))
    return speeds[1:]


def _hub_rows(engine: DraftEngine, client: HubClient, base: dict, n_tokens: int, repetitions: int) -> list[dict]:
    round_trips = _round_trips(client, repetitions * 10)
    bos = engine.detokenize([engine.bos_token_id], special=True).decode("utf-8", "replace")
    template = ChatTemplate(BUILTIN_TEMPLATES["plain"], bos_token=bos, eos_token="")
    edge, server_only = [], []
    tokens_per_verify, itl, accepted, drafted, ahead, hits = [], [], 0, 0, 0, 0
    for prompt in HUB_PROMPTS:
        conversation = Conversation(engine, client, template, DecodeSettings(max_tokens=n_tokens))
        reply = conversation.ask(prompt)
        conversation.close()
        edge.append(reply.stats.tokens_per_s)
        tokens_per_verify.append(reply.stats.tokens_per_verify)
        itl.append(reply.stats.itl_ms)
        ahead += reply.stats.proactive_drafts
        hits += reply.stats.proactive_hits
        accepted += reply.stats.accepted_tokens
        drafted += reply.stats.draft_tokens
        server_only.append(_server_only_speed(client, engine, reply.prompt_token_ids, n_tokens))
    hub_columns = {"hub": client.base_url}
    return [
        {
            **base,
            **hub_columns,
            "test": "rtt",
            "rtt_ms_p50": _percentile(round_trips, 0.5),
            "rtt_ms_p95": _percentile(round_trips, 0.95),
            **_mean_std([1000 / ms for ms in round_trips]),
        },
        {
            **base,
            **hub_columns,
            "test": f"hub-tg{n_tokens}",
            **_mean_std(edge),
            "tokens_per_verify": statistics.fmean(tokens_per_verify),
            "acceptance": accepted / drafted if drafted else 0.0,
            "itl_ms": statistics.fmean(itl),
            "proactive_hit_rate": hits / ahead if ahead else 0.0,
        },
        {**base, **hub_columns, "test": f"hub-only-tg{n_tokens}", **_mean_std(server_only)},
    ]


def _round_trips(client: HubClient, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.health()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _server_only_speed(client: HubClient, engine: DraftEngine, prompt: list[int], n_tokens: int) -> float:
    info = client.info()
    session = client.open_session(
        wire.OpenSessionRequest(
            vocab_size=engine.vocab_size,
            vocab_fingerprint=info.vocab_fingerprint,
            draft_model=engine.path.name,
            stop_token_ids=engine.stop_token_ids(),
        )
    )
    started = time.perf_counter()
    produced = sum(
        len(chunk.tokens)
        for chunk in client.generate(
            session.session_id, wire.GenerateRequest(mode="autoregressive", tokens=prompt, max_tokens=n_tokens)
        )
    )
    elapsed = time.perf_counter() - started
    client.close_session(session.session_id)
    return produced / elapsed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _render(rows: list[dict], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2)
    columns = ["model", "size", "params", "backend", "threads", "test", "t/s", "extra"]
    table = [
        [
            row["model"],
            _size(row["size"]),
            _params(row["params"]),
            row["backend"],
            str(row["threads"]),
            row["test"],
            f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f}",
            _extra(row),
        ]
        for row in rows
    ]
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([c for c in columns if c != "t/s"] + ["avg_ts", "stddev_ts"])
        for row, cells in zip(rows, table):
            writer.writerow(cells[:6] + [cells[7], f"{row['avg_ts']:.4f}", f"{row['stddev_ts']:.4f}"])
        return buffer.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    return "\n".join(lines)


def _extra(row: dict) -> str:
    if "rtt_ms_p50" in row:
        return f"RTT p50 {row['rtt_ms_p50']:.1f} ms, p95 {row['rtt_ms_p95']:.1f} ms"
    if "tokens_per_verify" in row:
        return (
            f"{row['tokens_per_verify']:.2f} tok/verify, accepted {row['acceptance']:.0%}, "
            f"ITL {row['itl_ms']:.1f} ms, proactive hits {row['proactive_hit_rate']:.0%}"
        )
    return ""


def _size(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _params(params: int) -> str:
    return f"{params / 1e6:.2f} M" if params < 1e9 else f"{params / 1e9:.2f} B"
