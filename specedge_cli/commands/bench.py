"""`specedge bench`: how fast this machine drafts, and whether edge assistance pays off.

Like llama-bench: prompt processing (`pp512`) and generation (`tg128`) of the draft model, mean
± std over repetitions. Generation drafts exactly as a chat does (chains up to the node budget),
and `--compare-raw` decodes the same file with plain llama-cpp-python, runs alternating, so the
two speeds and their ratio come from one run. With a hub (--hub, SPECEDGE_HUB or a login) it adds rows for the round
trip to the hub, end-to-end speed through the hub with tokens per verify and acceptance, and the
same prompts decoded by the hub alone in its server-only mode, side by side.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from specedge_cli import paths, settings
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.drafting.vocabulary import quiet_stderr
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
        int, typer.Option("--n-prompt", min=0, help="Prompt tokens for the pp test (0 skips it).")
    ] = 512,
    n_gen: Annotated[
        int, typer.Option("--n-gen", "-n", min=0, help="Generated tokens for the tg test (0 skips it).")
    ] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Repetitions of each test.")] = 5,
    output: Annotated[str, typer.Option("--output", "-o", help="md, json or csv.")] = "md",
    compare_raw: Annotated[
        bool,
        typer.Option("--compare-raw", help="Also decode with raw llama-cpp-python, side by side, and print the ratio."),
    ] = False,
    hub: Annotated[
        str | None, typer.Option(help="Also measure through this hub (default: SPECEDGE_HUB or your login).")
    ] = None,
    hub_tokens: Annotated[int, typer.Option(min=1, help="Tokens per hub prompt.")] = 64,
) -> None:
    """Benchmark drafting speed, and end-to-end speed through a hub; rows print as they finish."""
    if output not in ("md", "json", "csv"):
        raise typer.BadParameter("use md, json or csv", param_hint="--output")
    resolved = resolve_model(model, paths.models_dir())
    progress(f"loading {resolved.path.name}")
    engine = DraftEngine(resolved.path, n_ctx=max(1024, n_prompt + n_gen + 16), n_threads=threads)
    base = _model_columns(engine, threads)
    table = RowPrinter(output)
    if n_prompt:
        progress(f"pp{n_prompt}: {repetitions} runs")
        table.add({**base, "test": f"pp{n_prompt}", **_mean_std(_prompt_speeds(engine, n_prompt, repetitions))})
    if n_gen:
        progress(f"tg{n_gen}: {repetitions} runs" + (", alternating with raw llama-cpp-python" if compare_raw else ""))
        for row in _generation_rows(engine, base, n_gen, repetitions, compare_raw):
            table.add(row)
    address = settings.hub_address(hub)
    if address.url:
        with HubClient(address.url, address.token, insecure=address.insecure) as client:
            for row in _hub_rows(engine, client, base, hub_tokens, repetitions):
                table.add(row)
    table.close()


def progress(what: str) -> None:
    """What the bench does now, on stderr (a run takes minutes; the rows go to stdout)."""
    typer.echo(f"bench: {what}…", err=True)


class RowPrinter:
    """Markdown and CSV rows print as each test finishes; JSON is one array at the end."""

    def __init__(self, output: str):
        self.output = output
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        if not self.rows and self.output != "json":
            typer.echo(_header(self.output))
        self.rows.append(row)
        if self.output != "json":
            typer.echo(_render_row(row, self.output))

    def close(self) -> None:
        if self.output == "json":
            typer.echo(json.dumps(self.rows, indent=2))


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
    return ([engine.vocab.bos_token_id] + engine.vocab.tokenize(text, add_bos=False))[:n]


def _prompt_speeds(engine: DraftEngine, n: int, repetitions: int) -> list[float]:
    tokens = _test_tokens(engine, n)
    speeds = []
    for _ in range(repetitions + 1):  # the first run warms up and is not counted
        engine.reset()
        started = time.perf_counter()
        engine.evaluate(tokens)
        speeds.append(len(tokens) / (time.perf_counter() - started))
    return speeds[1:]


def _generation_rows(engine: DraftEngine, base: dict, n: int, repetitions: int, compare_raw: bool) -> Iterator[dict]:
    """The tg row; with `compare_raw`, raw llama-cpp-python's row and the ratio, runs alternating
    between the two so the machine's noise falls on both alike."""
    if not compare_raw:
        yield {**base, "test": f"tg{n}", **_mean_std(_timed(lambda: draft_tokens(engine, n), n, repetitions))}
        return
    raw = RawDecoder(engine.path, engine.n_threads, n_ctx=max(1024, n + 16))
    ours, theirs = [], []
    for _ in range(repetitions + 1):  # the first round warms both up and is not counted
        ours.append(_timed(lambda: draft_tokens(engine, n), n, 1)[0])
        theirs.append(_timed(lambda: raw.decode(n), n, 1)[0])
    speed = _mean_std(ours[1:])
    raw_speed = _mean_std(theirs[1:])
    yield {**base, "test": f"tg{n}", **speed, "vs_raw": speed["avg_ts"] / raw_speed["avg_ts"]}
    yield {**base, "test": f"tg{n}-raw", **raw_speed}


def _timed(run: Callable[[], int], n: int, repetitions: int) -> list[float]:
    """Tokens per second of `run` (which returns how many tokens it made, checked to be `n`)."""
    speeds = []
    for _ in range(repetitions):
        started = time.perf_counter()
        made = run()
        elapsed = time.perf_counter() - started
        if made != n:
            raise AssertionError(f"decoded {made} tokens, not {n}")
        speeds.append(made / elapsed)
    return speeds


def draft_tokens(engine: DraftEngine, n: int) -> int:
    """Draft `n` tokens greedily after BOS as a chat drafts: chains of at most the node budget,
    each continuing from the last (its accepted path is adopted, nothing is recomputed)."""
    engine.reset()
    history = [engine.vocab.bos_token_id]
    while len(history) - 1 < n:
        drafted = engine.draft(history, min(n - len(history) + 1, engine.max_tree_nodes))
        if not drafted:
            break
        history += drafted
    return len(history) - 1


class RawDecoder:
    """Plain llama-cpp-python greedy decoding, one token per eval: the speed to match."""

    def __init__(self, path: Path, n_threads: int, n_ctx: int):
        import llama_cpp

        self._lib = llama_cpp
        with quiet_stderr():
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=False, verbose=False
            )

    def decode(self, n: int) -> int:
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval([llm.token_bos()])
        for _ in range(n - 1):
            logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(logits.argmax())])
        return n


def _hub_rows(engine: DraftEngine, client: HubClient, base: dict, n_tokens: int, repetitions: int) -> Iterator[dict]:
    """The round trip, then edge-assisted and server-only speed over the same prompts."""
    hub_columns = {**base, "hub": client.base_url}
    progress(f"round trip to {client.base_url}: {repetitions * 10} requests")
    round_trips = _round_trips(client, repetitions * 10)
    yield {
        **hub_columns,
        "test": "rtt",
        "rtt_ms_p50": _percentile(round_trips, 0.5),
        "rtt_ms_p95": _percentile(round_trips, 0.95),
        "samples_ms": round_trips,
    }
    bos = engine.vocab.detokenize([engine.vocab.bos_token_id], special=True).decode("utf-8", "replace")
    template = ChatTemplate(BUILTIN_TEMPLATES["plain"], bos_token=bos, eos_token="")
    edge, server_only = [], []
    tokens_per_verify, itl, accepted, drafted, ahead, hits = [], [], 0, 0, 0, 0
    progress(f"{len(HUB_PROMPTS)} prompts through the hub, edge-assisted and server-only")
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
    yield {
        **hub_columns,
        "test": f"hub-tg{n_tokens}",
        **_mean_std(edge),
        "tokens_per_verify": statistics.fmean(tokens_per_verify),
        "acceptance": accepted / drafted if drafted else 0.0,
        "itl_ms": statistics.fmean(itl),
        "proactive_hit_rate": hits / ahead if ahead else 0.0,
    }
    yield {**hub_columns, "test": f"hub-only-tg{n_tokens}", **_mean_std(server_only)}


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
            vocab_size=engine.vocab.size,
            vocab_fingerprint=info.vocab_fingerprint,
            draft_model=engine.path.name,
            stop_token_ids=engine.vocab.stop_token_ids(),
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


COLUMNS = ["model", "size", "params", "backend", "threads", "test", "t/s", "rtt ms", "extra"]


def _header(output: str) -> str:
    if output == "csv":
        return ",".join(
            [
                "model",
                "size",
                "params",
                "backend",
                "threads",
                "test",
                "extra",
                "avg_ts",
                "stddev_ts",
                "rtt_ms_p50",
                "rtt_ms_p95",
            ]
        )
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|"


def _render_row(row: dict, output: str) -> str:
    """One row of the md or csv table; the round trip has its own column, never a speed's."""
    speed = f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f}" if "avg_ts" in row else "-"
    rtt = f"{row['rtt_ms_p50']:.1f} (p95 {row['rtt_ms_p95']:.1f})" if "rtt_ms_p50" in row else "-"
    cells = [
        row["model"],
        _size(row["size"]),
        _params(row["params"]),
        row["backend"],
        str(row["threads"]),
        row["test"],
    ]
    if output == "csv":
        buffer = io.StringIO()
        numbers = [row.get(key) for key in ("avg_ts", "stddev_ts", "rtt_ms_p50", "rtt_ms_p95")]
        csv.writer(buffer).writerow(cells + [_extra(row)] + ["" if v is None else f"{v:.4f}" for v in numbers])
        return buffer.getvalue().rstrip("\r\n")
    return "| " + " | ".join([*cells, speed, rtt, _extra(row)]) + " |"


def _extra(row: dict) -> str:
    if "vs_raw" in row:
        return f"{row['vs_raw']:.1%} of raw llama-cpp-python"
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
