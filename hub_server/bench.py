"""`hub_server bench`: what a hub sustains, SpecEdge against its server-only baselines.

N simulated users each draft with a real llama.cpp draft model (their "edge") and talk to a real
hub over HTTP with an emulated round-trip time. Three modes run side by side in one process:
  specedge          the users draft, the hub verifies (batched across users)
  server_only_spec  the hub drafts with its own copy of the draft model and verifies
  autoregressive    the hub decodes with the target alone
Server throughput counts only the hub's busy time (its forward passes, plus its own drafting in
server_only_spec), read from the hub's /metrics, so edge drafting on the same machine does not
count against the hub. When the hub is started here, it and the edges are pinned to different
cores where the machine has more than one.

Each user has an edge device of their own, so N users draft at once, never N times slower. One
machine cannot run N draft models side by side, so the edges are emulated (`EmulatedEdges`):
before the timed runs, the draft model drafts for real at every point of every prompt's reply
(the target's own greedy reply, asked of the hub once), and during a run each user takes its
real draft from that store and waits as long as its own device would take to draft it, at the
draft speed measured here (or `--edge-tps`). Drafting then costs the timed run no CPU, and the
verifies reach the hub when N parallel edges would send them. Like `specedge chat`, a user
drafts its next round while a verify is out (`--no-proactive` turns that off), below the
likeliest outcome: the whole draft accepted, then the draft model's own next token. When that
comes back, the next draft is ready when a device that began it at the send would be done.

The bound ("what the hardware allows") is tokens per verify x the cost of a one-token pass over
all N sessions / that of a verify pass over all N. With a hub started here it is measured
directly after the runs (`probe.py`); against a running hub, through its API: N sessions send
one-token and verify requests back to back, and /metrics counts the passes they make by size.
Prompts fed in passes of their own are counted apart (`prefill_busy_s`), and the share of the
bound compares decode throughput without them: both modes feed the same prompts.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import httpx

from hub_server import protocol as wire
from hub_server.engine.drafter import HubDrafter

MODES = ("specedge", "server_only_spec", "autoregressive")


@dataclass(frozen=True)
class BenchConfig:
    hub_url: str
    draft: Path
    clients: int
    rtt_ms: float
    max_tokens: int
    draft_len: int
    prompts: tuple[str, ...]
    edge_tps: float = 0.0  # each emulated edge's draft speed; 0: the speed measured here
    token: str | None = None  # API token for a hub that needs one
    proactive: bool = True  # edges draft ahead while a verify is out, as `specedge chat` does


class BenchRefused(ValueError):
    """The bench cannot measure this hub as asked; the message says what to do instead."""


def check_hub(info: dict, drafter: HubDrafter, modes: tuple[str, ...]) -> None:
    """Refuse, before any run, a draft whose vocabulary is not the target's (its drafts would be
    another model's token ids: lossless still, but every figure meaningless) and a mode the hub
    does not serve."""
    if drafter.vocab_fingerprint() != info["vocab_fingerprint"]:
        raise BenchRefused(
            f"the draft {drafter.name} has another vocabulary than the hub's target "
            f"{info['model']}: pass the --draft that goes with that target"
        )
    if "server_only_spec" in modes and "speculative" not in info["modes"]:
        raise BenchRefused(
            f"the hub serving {info['model']} has no draft model of its own, so it cannot run "
            "server_only_spec: pass --modes specedge,autoregressive, or start it with --draft"
        )


def hub_client(config: BenchConfig, timeout: float = 60) -> httpx.Client:
    """A connection to the hub under test, with the token where one is given."""
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    return httpx.Client(base_url=config.hub_url, timeout=timeout, headers=headers)


def hub_info(client: httpx.Client) -> dict:
    """The hub's /v1/info; a refusal (no token, a revoked one) raises httpx.HTTPStatusError."""
    response = client.get("/v1/info")
    response.raise_for_status()
    return response.json()


def run_all(calls: list[Callable[[], object]]) -> None:
    """Run the calls in threads of their own, all at once; re-raise the first that failed."""
    errors: list[BaseException] = []

    def guarded(call) -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@dataclass
class ClientRecord:
    emitted: int = 0
    step_itl_ms: list[float] = field(default_factory=list)  # per token: step time / tokens in step
    ttft_ms: list[float] = field(default_factory=list)
    drafts_ahead: int = 0  # verifies sent while the edge could draft the next round ahead
    ahead_hits: int = 0  # ... whose guessed outcome came back, so that draft was sent


def load_prompts() -> tuple[str, ...]:
    text = resources.files("hub_server").joinpath("bench_prompts.json").read_text()
    return tuple(item["prompt"] for item in json.loads(text))


def _scrape(client: httpx.Client) -> dict[str, float]:
    values = {}
    page = client.get("/metrics")
    page.raise_for_status()  # 403 for a token that is not an operator's: the refusal says so
    for line in page.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _hub_busy(metrics: dict[str, float]) -> float:
    return metrics.get("specedge_device_busy_seconds_total", 0.0) + metrics.get("specedge_hub_draft_seconds_total", 0.0)


def _verify(client: httpx.Client, session: str, tokens: list[int], draft: list[int]) -> dict:
    response = client.post(f"/v1/sessions/{session}/verify", json={"tokens": tokens, "draft": draft})
    response.raise_for_status()
    return response.json()


def _open(client: httpx.Client, info: dict) -> str:
    body = wire.OpenSessionRequest(
        protocol_version=wire.PROTOCOL_VERSION,
        vocab_size=info["vocab_size"],
        vocab_fingerprint=info["vocab_fingerprint"],
        draft_model="bench",
    )
    response = client.post("/v1/sessions", json=body.model_dump())
    response.raise_for_status()
    return response.json()["session_id"]


class EmulatedEdges:
    """Real drafts from the draft model, delivered as fast as each user's own device would draft them.

    Greedy drafting is a function of the context, so each context's next draft token is computed
    once (on first need) and kept; `prepare` computes them along every prompt's reply before the
    timed runs, and measures the draft speed on the way.
    """

    def __init__(self, drafter: HubDrafter, tokens_per_second: float = 0.0):
        self._drafter = drafter
        self._next: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()  # one llama.cpp context: one draft step at a time
        self.tokens_per_second = tokens_per_second
        self.steps = 0
        self.step_seconds = 0.0

    def prepare(self, contexts: list[list[int]], draft_len: int) -> None:
        """Draft below every context up front; set the edge speed from these steps if not given."""
        for context in contexts:
            self._draft(context, draft_len)
        if not self.tokens_per_second:
            self.tokens_per_second = self.steps / self.step_seconds if self.step_seconds else 1000.0

    def draft(self, context: list[int], length: int, since: float | None = None) -> list[int]:
        """`length` real draft tokens after `context`, returned when the user's device would be
        done drafting them had it started at `since` (a perf_counter time; default now)."""
        started = time.perf_counter() if since is None else since
        tokens = self._draft(context, length)
        time.sleep(max(0.0, length / self.tokens_per_second - (time.perf_counter() - started)))
        return tokens

    def next_token(self, context: list[int]) -> int:
        """The draft model's own next token after `context` (no wait: a by-product of drafting)."""
        return self._next_token(list(context))

    def _draft(self, context: list[int], length: int) -> list[int]:
        extended = list(context)
        for _ in range(length):
            extended.append(self._next_token(extended))
        return extended[len(context) :]

    def _next_token(self, context: list[int]) -> int:
        key = tuple(context)
        token = self._next.get(key)
        if token is None:
            with self._lock:
                started = time.perf_counter()
                token = self._drafter.draft("edge", context, 1)[0]
                self.step_seconds += time.perf_counter() - started
                self.steps += 1
            self._next[key] = token
        return token


class SimulatedUser:
    """One user: an edge device of their own, their prompts in turn, one mode at a time."""

    def __init__(self, index: int, config: BenchConfig, edge: EmulatedEdges, info: dict, stop_ids: frozenset[int]):
        self.index = index
        self.config = config
        self.edge = edge
        self.info = info
        self.stop_ids = stop_ids
        self.record = ClientRecord()
        self.replies: dict[tuple[int, ...], list[int]] = {}  # prompt -> what this user received

    def run(self, mode: str, prompt_tokens: list[list[int]]) -> None:
        with hub_client(self.config, timeout=600) as client:
            for prompt in prompt_tokens:
                session = _open(client, self.info)
                if mode == "specedge":
                    reply = self._specedge(client, session, prompt)
                else:
                    reply = self._server_only(
                        client, session, prompt, "speculative" if mode == "server_only_spec" else "autoregressive"
                    )
                self.replies[tuple(prompt)] = reply
                client.delete(f"/v1/sessions/{session}")

    def _half_rtt(self) -> None:
        time.sleep(self.config.rtt_ms / 2000)

    def _specedge(self, client: httpx.Client, session: str, prompt: list[int]) -> list[int]:
        context, pending, produced = list(prompt), list(prompt), 0
        started = time.perf_counter()
        drafting_since = None  # when the edge began the next draft, if before this step
        while produced < self.config.max_tokens:
            step_started = time.perf_counter()
            room = self.config.max_tokens - produced - 1
            draft = self.edge.draft(context, min(self.config.draft_len, room), drafting_since) if room > 0 else []
            sent = time.perf_counter()
            self._half_rtt()
            reply = _verify(client, session, pending, draft)
            self._half_rtt()
            emitted = reply["tokens"]
            drafting_since = self._drafted_ahead(sent, context, draft, emitted, room)
            pending = []
            context += emitted
            produced += len(emitted)
            self._record_step(started, step_started, len(emitted), first=produced == len(emitted))
            if emitted[-1] in self.stop_ids:
                break
        return context[len(prompt) :]

    def _drafted_ahead(
        self, sent: float, context: list[int], draft: list[int], emitted: list[int], room: int
    ) -> float | None:
        """Proactive drafting, as the real client does it: while a verify is out, the edge drafts
        the next round below its likeliest outcome, every draft token accepted and then the
        draft model's own next token. When that is what comes back, the next draft began when
        this verify was sent (returns that time); otherwise it begins now (None). The guess is
        only looked at when the whole draft was accepted, so it never costs a draft step here.
        `room`: the tokens this step could emit beyond its bonus token."""
        if not (self.config.proactive and draft) or room - len(draft) - 1 <= 0:
            return None  # no next round to draft for after the guessed outcome
        self.record.drafts_ahead += 1
        if emitted[:-1] == draft and emitted[-1] == self.edge.next_token(context + draft):
            self.record.ahead_hits += 1
            return sent
        return None

    def _server_only(self, client: httpx.Client, session: str, prompt: list[int], mode: str) -> list[int]:
        body = {
            "mode": mode,
            "tokens": prompt,
            "max_tokens": self.config.max_tokens,
            "draft_len": self.config.draft_len,
        }
        started = time.perf_counter()
        self._half_rtt()
        step_started, produced, reply = started, 0, []
        with client.stream("POST", f"/v1/sessions/{session}/generate", json=body) as response:
            if response.is_error:
                response.read()
                response.raise_for_status()
            for line in response.iter_lines():
                chunk = json.loads(line)
                if chunk["done"]:
                    break
                if produced == 0:
                    self._half_rtt()  # the first chunk travels back; later ones stream behind it
                produced += len(chunk["tokens"])
                reply += chunk["tokens"]
                self._record_step(started, step_started, len(chunk["tokens"]), first=produced == len(chunk["tokens"]))
                step_started = time.perf_counter()
        return reply

    def _record_step(self, started: float, step_started: float, tokens: int, first: bool) -> None:
        now = time.perf_counter()
        self.record.emitted += tokens
        if first:
            self.record.ttft_ms.append((now - started) * 1000)
            return
        self.record.step_itl_ms.extend([(now - step_started) * 1000 / tokens] * tokens)


def _rotated(prompts: list[list[int]], start: int) -> list[list[int]]:
    start %= len(prompts)
    return prompts[start:] + prompts[:start]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_mode(mode: str, config: BenchConfig, users: list[SimulatedUser], prompt_tokens: list[list[int]]) -> dict:
    for user in users:
        user.record = ClientRecord()
        user.replies = {}
    with hub_client(config) as client:
        before = _scrape(client)
        started = time.perf_counter()
        # Each user starts at a different prompt so the mix is the same whatever N is.
        run_all([lambda u=u: u.run(mode, _rotated(prompt_tokens, u.index)) for u in users])
        wall = time.perf_counter() - started
        after = _scrape(client)

    def grew(name: str) -> float:  # counters a hub of an older version may not have
        return after.get(name, 0.0) - before.get(name, 0.0)

    busy = _hub_busy(after) - _hub_busy(before)
    # Context is fed apart from verifies, or inside a verify pass (a prompt sent with its first
    # verify, as clients do): those tokens at the fitted cost per token.
    in_verify = grew("specedge_verify_context_tokens_total")
    in_verify_s = in_verify * after.get("specedge_pass_token_seconds", 0.0)
    prefill = grew("specedge_prefill_seconds_total") + in_verify_s
    passes = after["specedge_batches_total"] - before["specedge_batches_total"]
    verifies = after["specedge_verify_seconds_count"] - before["specedge_verify_seconds_count"]
    emitted = sum(u.record.emitted for u in users)
    itl = [x for u in users for x in u.record.step_itl_ms]
    drafts_ahead, ahead_hits = sum(u.record.drafts_ahead for u in users), sum(u.record.ahead_hits for u in users)
    ttft = [x for u in users for x in u.record.ttft_ms]
    return {
        "emitted_tokens": emitted,
        "server_throughput": emitted / busy if busy else 0.0,
        "wall_throughput": emitted / wall,
        "tokens_per_verify": emitted / verifies if verifies else 0.0,
        "itl_ms_mean": statistics.fmean(itl) if itl else 0.0,
        "itl_ms_p95": _percentile(itl, 0.95),
        "ttft_ms_mean": statistics.fmean(ttft) if ttft else 0.0,
        "hub_busy_fraction": busy / wall,
        "hub_busy_s": busy,
        # Prompts cost every mode alike; without them, what decoding costs.
        "prefill_busy_s": prefill,
        "prefill_in_verify_s": in_verify_s,  # of which inside verify passes
        "verify_context_tokens": in_verify,
        "decode_throughput": emitted / (busy - prefill) if busy > prefill else 0.0,
        "forward_passes": passes,
        "busy_ms_per_pass": 1000
        * (after["specedge_device_busy_seconds_total"] - before["specedge_device_busy_seconds_total"])
        / passes
        if passes
        else 0.0,
        "verifies_per_pass": verifies / passes if passes else 0.0,
        # Batches held for users due back soon (--merge-wait-share), and for how long in all.
        "merge_waits": grew("specedge_merge_waits_total"),
        "merge_wait_s": grew("specedge_merge_wait_seconds_total"),
        "pass_fixed_ms": 1000 * after.get("specedge_pass_fixed_seconds", 0.0),
        "user_return_ms": 1000 * after.get("specedge_user_return_seconds", 0.0),
        "pass_ms_by_sessions": _pass_ms_by_sessions(before, after),
        "wall_s": wall,
        # SpecEdge users' drafts made ahead while a verify was out, and the share that was sent.
        "proactive_drafts": drafts_ahead,
        "proactive_hit_rate": ahead_hits / drafts_ahead if drafts_ahead else 0.0,
    }


def _pass_ms_by_sessions(before: dict[str, float], after: dict[str, float]) -> dict[int, list[float]]:
    """{sessions in a pass: [passes, mean device ms]} over one mode's run, from /metrics."""
    table = {}
    for name, count in after.items():
        if name.startswith('specedge_verify_passes_total{sessions="'):
            size = name.split('"')[1]
            seconds_name = f'specedge_verify_pass_seconds_total{{sessions="{size}"}}'
            passes = count - before.get(name, 0.0)
            if passes:
                seconds = after[seconds_name] - before.get(seconds_name, 0.0)
                table[int(size)] = [passes, round(1000 * seconds / passes, 2)]
    return dict(sorted(table.items()))


def pass_ms_at(table: dict[int, list[float]], sessions: int) -> float:
    """A pass's device time with `sessions` sessions in it: a line through the passes seen
    (least squares, weighted by how often each size ran), or their mean where one size ran."""
    total = sum(count for count, _ in table.values())
    if not total:
        return 0.0
    mean_size = sum(size * count for size, (count, _) in table.items()) / total
    mean_ms = sum(ms * count for count, ms in table.values()) / total
    spread = sum(count * (size - mean_size) ** 2 for size, (count, _) in table.items())
    if not spread:
        return mean_ms
    slope = sum(count * (size - mean_size) * (ms - mean_ms) for size, (count, ms) in table.items()) / spread
    return mean_ms + slope * (sessions - mean_size)


@dataclass
class Workload:
    """What every run of one bench shares: the prompts, their target replies and the edges."""

    prompt_tokens: list[list[int]]
    replies: dict[tuple[int, ...], list[int]]  # the target's own greedy reply to each prompt
    edges: EmulatedEdges
    stop_ids: frozenset[int]


def prepare_workload(config: BenchConfig, modes: tuple[str, ...] = MODES) -> Workload:
    """Check that the hub can run `modes` with this draft, ask it for each prompt's reply
    (autoregressive, untimed) and draft along every reply."""
    with hub_client(config) as client:
        info = hub_info(client)  # before loading the draft: a hub that refuses says so at once
    drafter = HubDrafter(config.draft, n_threads=1)
    check_hub(info, drafter, modes)
    prompt_tokens = [drafter.tokenize(p) for p in config.prompts]
    reference = SimulatedUser(0, config, None, info, frozenset())
    run_all([lambda p=p: reference.run("autoregressive", [p]) for p in prompt_tokens])
    edges = EmulatedEdges(drafter, config.edge_tps)
    edges.prepare([list(p) + r[:i] for p, r in reference.replies.items() for i in range(len(r))], config.draft_len)
    return Workload(prompt_tokens, reference.replies, edges, drafter.stop_token_ids())


def run_bench(config: BenchConfig, modes: tuple[str, ...] = MODES, workload: Workload | None = None) -> dict:
    with hub_client(config) as client:
        info = hub_info(client)
    workload = workload or prepare_workload(config, modes)
    users = [SimulatedUser(i, config, workload.edges, info, workload.stop_ids) for i in range(config.clients)]
    results = {}
    for mode in modes:
        results[mode] = run_mode(mode, config, users, workload.prompt_tokens)
        results[mode]["lossless"] = all(u.replies == workload.replies for u in users)
    return {
        "modes": results,
        "ratios": _ratios(results),
        "bound": _bound(results, config.clients),
        "config": {
            "hub": config.hub_url,
            "target": info["model"],
            "draft": config.draft.name,
            "clients": config.clients,
            "rtt_ms": config.rtt_ms,
            "max_tokens": config.max_tokens,
            "draft_len": config.draft_len,
            "prompts": len(config.prompts),
            "cpu_count": os.cpu_count(),
            "edge_tps": round(workload.edges.tokens_per_second, 1),
            "proactive": config.proactive,
        },
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _ratios(results: dict) -> dict:
    spec, ar, sos = results.get("specedge"), results.get("autoregressive"), results.get("server_only_spec")
    ratios = {}
    if spec and ar:
        ratios["throughput_vs_autoregressive"] = _ratio(spec["server_throughput"], ar["server_throughput"])
    if spec and sos:
        ratios["throughput_vs_server_only_spec"] = _ratio(spec["server_throughput"], sos["server_throughput"])
        ratios["itl_vs_server_only_spec"] = _ratio(spec["itl_ms_mean"], sos["itl_ms_mean"])
    return ratios


def _bound(results: dict, clients: int) -> dict:
    """What the hardware allows at this load: tokens per verify x the device time of a one-token
    pass over all `clients` sessions / that of a verify pass over all of them, read off the
    passes each mode ran (a line through their sizes). An extrapolation where a mode never ran
    full passes, so a bench that started its hub replaces it with `probe_bounds`."""
    spec, ar = results.get("specedge"), results.get("autoregressive")
    if not (spec and ar):
        return {}
    one_token_ms = pass_ms_at(ar["pass_ms_by_sessions"], clients)
    verify_ms = pass_ms_at(spec["pass_ms_by_sessions"], clients)
    if not (one_token_ms > 0 and verify_ms > 0):
        return {}
    return _bound_from(results, clients, one_token_ms, verify_ms, "passes seen")


def _bound_from(results: dict, clients: int, one_token_ms: float, verify_ms: float, measured: str) -> dict:
    spec, ar = results["specedge"], results["autoregressive"]
    bound = spec["tokens_per_verify"] * one_token_ms / verify_ms
    # The bound counts passes only, so the share of it compares decoding alone: the prompts'
    # prefill, the same work in both modes, would otherwise pull any ratio towards 1.
    decode_ratio = spec["decode_throughput"] / ar["decode_throughput"] if ar["decode_throughput"] else 0.0
    return {
        "throughput_vs_autoregressive": round(bound, 3),
        "measured": measured,
        "sessions_per_pass": clients,
        "one_token_pass_ms": round(one_token_ms, 2),
        "verify_pass_ms": round(verify_ms, 2),
        "decode_throughput_vs_autoregressive": round(decode_ratio, 3),
        "share_of_bound": round(decode_ratio / bound, 3) if bound else 0.0,
        # The share's two halves: each mode's decoding against full passes at the probe's cost.
        "specedge_share_of_full_passes": round(
            spec["decode_throughput"] * verify_ms / (1000 * clients * spec["tokens_per_verify"]), 3
        ),
        "autoregressive_share_of_full_passes": round(ar["decode_throughput"] * one_token_ms / (1000 * clients), 3),
    }


def probe_bounds(runs: list[dict], model: str, device: str, dtype: str, workload: Workload, cores: set[int]) -> None:
    """Measure each run's bound directly, once the hub this bench started has stopped: a
    one-token pass and a verify pass over all N sessions on the hub's own runner, with the same
    device, dtype and cores, with contexts spread like the runs' (from the prompt to the reply's
    end: a pass is as wide as its longest past)."""
    import torch

    from hub_server.engine.probe import PassProbe

    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    config = runs[0]["config"]
    prompt = statistics.fmean(len(p) for p in workload.prompt_tokens)
    context = int(prompt + config["max_tokens"] / 2)
    spread = config["max_tokens"]  # users are anywhere between their prompt and its reply's end
    probe = PassProbe(
        model,
        device=device,
        dtype=dtype,
        sessions=max(run["config"]["clients"] for run in runs),
        context=context,
        draft_tokens=config["draft_len"],
        spread=spread,
    )
    for run in runs:
        results, clients = run["modes"], run["config"]["clients"]
        if "specedge" in results and "autoregressive" in results:
            one_token_ms, verify_ms = probe.pass_pair_ms(clients, config["draft_len"])
            run["bound"] = _bound_from(
                results,
                clients,
                one_token_ms,
                verify_ms,
                f"probe: contexts {context - spread // 2}-{context + spread // 2}",
            )


def probe_bounds_through_hub(
    runs: list[dict], config: BenchConfig, workload: Workload, rounds: int = 4, verifies: int = 3
) -> None:
    """Measure each run's bound on a hub this bench did not start, through its public API.

    N sessions, each holding one of the prompts, send verifies back to back with no round trip,
    in turns of `verifies` each: with empty drafts (one-token passes) and with `draft_len` random
    draft tokens (verify passes; what a pass costs does not depend on what it accepts). Users
    due back at once share passes (the hub's merge wait), so most passes hold all N, and each
    kind's cost at N is read off its own passes in /metrics, turn by turn, so that a machine
    speeding up or slowing down moves both alike. Other users of the hub join those passes too:
    measure a quiet hub.
    """
    for run in runs:
        results, clients = run["modes"], run["config"]["clients"]
        if not ("specedge" in results and "autoregressive" in results):
            continue
        one_token, verify = _passes_through_hub(replace(config, clients=clients), workload, rounds, verifies)
        one_token_ms, verify_ms = pass_ms_at(one_token, clients), pass_ms_at(verify, clients)
        if one_token_ms > 0 and verify_ms > 0:
            sizes = "/".join(str(size) for size in sorted(set(one_token) | set(verify)))
            run["bound"] = _bound_from(
                results, clients, one_token_ms, verify_ms, f"through the hub's API: passes of {sizes} sessions"
            )


def _passes_through_hub(
    config: BenchConfig, workload: Workload, rounds: int, verifies: int
) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """{sessions in a pass: [passes, mean device ms]} of the one-token passes and of the verify
    passes that `probe_bounds_through_hub` has the hub run."""
    rng = random.Random(0)
    users = [hub_client(config) for _ in range(config.clients)]  # a connection each, as users have
    sessions: list[str] = []
    try:
        info = hub_info(users[0])
        for user in users:
            sessions.append(_open(user, info))
        prompts = workload.prompt_tokens
        run_all(
            [
                lambda u=u, s=s, p=prompts[i % len(prompts)]: _verify(u, s, p, [])
                for i, (u, s) in enumerate(zip(users, sessions))
            ]
        )
        seen: dict[int, dict[int, list[float]]] = {0: {}, config.draft_len: {}}
        for _ in range(rounds):
            for draft_len, table in seen.items():
                drafts = [[rng.randrange(10, info["vocab_size"]) for _ in range(draft_len)] for _ in users]
                before = _scrape(users[0])
                run_all(
                    [
                        lambda u=u, s=s, d=d: [_verify(u, s, [], d) for _ in range(verifies)]
                        for u, s, d in zip(users, sessions, drafts)
                    ]
                )
                _add_passes(table, _pass_ms_by_sessions(before, _scrape(users[0])))
    finally:
        for user, session in zip(users, sessions):  # also when the hub refused something midway
            try:
                user.delete(f"/v1/sessions/{session}")
            except httpx.HTTPError:
                pass  # the hub is gone; it ends idle sessions itself
        for user in users:
            user.close()
    return seen[0], seen[config.draft_len]


def _add_passes(table: dict[int, list[float]], more: dict[int, list[float]]) -> None:
    """Fold `more` ({sessions: [passes, mean ms]}) into `table`."""
    for size, (count, ms) in more.items():
        had, had_ms = table.get(size, [0, 0.0])
        table[size] = [had + count, round((had * had_ms + count * ms) / (had + count), 2)]


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [run["config"]["clients"] for run in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        if mode in runs[0]["modes"]:
            left.plot(clients, [r["modes"][mode]["server_throughput"] for r in runs], marker="o", label=mode)
            right.plot(clients, [r["modes"][mode]["itl_ms_mean"] for r in runs], marker="o", label=mode)
    left.set(xlabel="clients", ylabel="server throughput (tokens / hub-busy s)", title="Throughput")
    right.set(xlabel="clients", ylabel="mean ITL (ms)", title="Inter-token latency")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"{runs[0]['config']['target']} / {runs[0]['config']['draft']}, RTT {runs[0]['config']['rtt_ms']:g} ms"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
