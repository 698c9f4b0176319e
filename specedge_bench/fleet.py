"""Many users over many workers, simulated in virtual time with the hub's real scheduler and placement.

No torch, no model, no sockets: a discrete-event simulation of a fleet of engine workers and the
users they serve, past what one machine can run.

Real (the hub's own code, unchanged):
- each worker's steps: `hub_server.scheduler.Scheduler`, made with `worker=False` and driven by
  `poll`/`finish`/`chunk_done` on the simulation's clock, so who shares a pass, how long a batch
  waits for announced jobs and for users due back (the merge wait), which rows' context goes in
  passes of its own first (`Composition`, at the device's pass overhead and widest row), and how
  a long prompt goes in chunks beside the verifies (the prompts queued, the chunks carved) are
  the hub's own decisions;
- each step's prompt budget: the hub's own `PromptBudget`, told the simulated verify passes' and
  chunks' times as the hub tells it the real ones (or `--max-pass-tokens`); which new text rides
  in a verify and which goes as a prompt: `INLINE_PROMPT_TOKENS`, as the hub decides;
- each worker's estimate of a pass's fixed part (what the merge wait reads): the hub's own
  `PassCostFit`, fed the simulated passes as the runner feeds it real ones;
- where each new session goes: `hub_server.placement.placement_order` (most free KV slots, then
  the shortest queue).

Measured (docs/benchmarks.md, docs/bench/*.json; see `PAIRS`): what a pass costs the device by
sessions and tokens in it, and the tokens a verify emits. A target too large for one GPU (a
worker of several GPUs, `--tensor-parallel`) has no measured passes yet: its pass is modelled
from the GPUs' specifications (`TensorParallelPass`), and its price is its GPUs'.

Modelled (not measured): a pass's cost between and beyond the measured sizes (a least-squares
plane through the measured passes: fixed + per session + per token; contexts as in the probe; a
verify pass's rows padded to its widest, as the runner lays them out, its compiled buckets left
aside; a context fed apart or a prompt chunk in passes of at most `FEED_CHUNK` tokens, one session
each, as the runner feeds them); acceptance (each draft token accepted with one probability, set so the mean tokens per
verify is the measured one); edges drafting at a fixed speed (no proactive drafting: a
conservative choice); the network (a fixed round trip, no jitter, no loss); the users (a reply of
`max_tokens`, think time between replies, a turn's new text of `prompt_tokens`, or now and then
a pasted document of `long_prompt_tokens`, arrivals and departures at random); the front end
(HTTP, placement and the hop to a worker cost nothing here: measured apart in
`benchmarks/hub_overhead.py`).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
import statistics
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from hub_server.pass_cost import PassCostFit
from hub_server.placement import READY, WorkerLoad, placement_order
from hub_server.prompts import INLINE_PROMPT_TOKENS, PromptBudget
from hub_server.scheduler import Composition, Prompt, Scheduler, Step
from specedge_bench.config import EDGE_PRICE_PER_HOUR, SERVER_PRICE_PER_HOUR


@dataclass(frozen=True)
class PassCosts:
    """A pass's device time: fixed + per session + per token (seconds), fitted to measured passes."""

    fixed_s: float
    per_session_s: float
    per_token_s: float

    def seconds(self, sessions: int, tokens: int) -> float:
        return self.fixed_s + self.per_session_s * sessions + self.per_token_s * tokens

    @classmethod
    def fit(cls, passes: list[tuple[int, int, float]]) -> PassCosts:
        """Least squares through measured passes (sessions, tokens, ms), no term below zero."""
        import numpy as np

        rows = np.array([[1.0, s, t] for s, t, _ in passes])
        ms = np.array([m for _, _, m in passes])
        keep = [0, 1, 2]
        while True:
            solution, *_ = np.linalg.lstsq(rows[:, keep], ms, rcond=None)
            negative = [k for k, value in zip(keep, solution) if value < 0 and k]
            if not negative:
                break
            keep.remove(negative[0])  # a term the passes do not support: leave it out
        terms = dict.fromkeys((0, 1, 2), 0.0) | {k: float(v) / 1000 for k, v in zip(keep, solution)}
        return cls(terms[0], terms[1], terms[2])


@dataclass(frozen=True)
class TensorParallelPass:
    """A pass of a target split over the GPUs of one node (tensor parallelism), modelled from the
    GPUs' specifications at stated efficiencies: no such pass has been measured here. Each GPU
    reads its share of the weights once a pass and computes its share of every token's products,
    one after the other (no overlap: the conservative side), and each layer's two all-reduces cost
    a latency plus the activations' bytes at the link's speed (a ring moves 2 (g - 1) / g of them)."""

    devices: int
    weight_bytes: float  # the whole target's
    flops_per_token: float  # 2 x parameters: a token's products (attention over the context left out)
    layers: int
    hidden_size: int
    element_bytes: int
    memory_bytes_per_s: float  # one GPU reading its weights, as reached
    flops_per_s: float  # one GPU's products, as reached
    all_reduce_latency_s: float
    link_bytes_per_s: float  # an all-reduce's bus bandwidth, as reached

    @property
    def costs(self) -> PassCosts:
        exchanges = 2 * self.layers
        reads = self.weight_bytes / self.devices / self.memory_bytes_per_s
        moved = 2 * (self.devices - 1) / self.devices * self.hidden_size * self.element_bytes  # a token's, a link's
        products = self.flops_per_token / self.devices / self.flops_per_s
        return PassCosts(
            reads + exchanges * self.all_reduce_latency_s, 0.0, products + exchanges * moved / self.link_bytes_per_s
        )


@dataclass(frozen=True)
class Pair:
    """A target/draft pair as measured (or its passes modelled): its passes and what a verify emits."""

    name: str
    passes: tuple[tuple[int, int, float], ...]  # (sessions, tokens, device ms), measured
    tokens_per_verify: float  # measured, at `draft_len`
    draft_len: int
    source: str
    devices: int = 1  # GPUs a worker spans (and is paid for)
    modelled: TensorParallelPass | None = None  # the pass's cost where none was measured

    @property
    def costs(self) -> PassCosts:
        return self.modelled.costs if self.modelled else PassCosts.fit(list(self.passes))


# A Llama-3-70B-class target (70.6B parameters, 80 layers, hidden 8192, bfloat16) on 4 H100 SXM
# GPUs of one node. Spec sheet: 3.35 TB/s of HBM3, 989 TFLOP/s of dense bf16, NVLink 4 at 900 GB/s.
# Assumed as reached: 70% of the memory bandwidth for weight reads, 40% of the FLOP/s for a verify
# pass's products (tens to hundreds of rows), an all-reduce of 20 us plus 360 GB/s of bus bandwidth
# (NCCL's all-reduce on NVLink 4, order of magnitude). Gives 18.2 ms a pass + 0.1 ms a token.
LLAMA_70B_TP4 = TensorParallelPass(
    devices=4,
    weight_bytes=141e9,
    flops_per_token=141e9,
    layers=80,
    hidden_size=8192,
    element_bytes=2,
    memory_bytes_per_s=0.70 * 3.35e12,
    flops_per_s=0.40 * 989e12,
    all_reduce_latency_s=20e-6,
    link_bytes_per_s=360e9,
)


# The pass probe's one-token and verify passes (8-token chains), H100, float32, contexts ~34
# tokens: the `bound` of docs/bench/gpu-{gemma,qwen}-fp32-{1,16,64}.json; tokens per verify from
# the same runs' specedge mode.
PAIRS = {
    "gemma": Pair(
        "Gemma 3 270M / its Q4_K_M GGUF (H100, fp32)",
        ((1, 1, 21.17), (16, 16, 22.11), (64, 64, 31.87), (1, 9, 22.48), (16, 144, 24.28), (64, 576, 38.05)),
        7.38,
        8,
        "docs/bench/gpu-gemma-fp32-{1,16,64}.json",
    ),
    "qwen": Pair(
        "Qwen2.5-Coder 1.5B / 0.5B (H100, fp32)",
        ((1, 1, 35.17), (16, 16, 32.68), (1, 9, 33.25), (16, 144, 37.43)),
        5.05,
        8,
        "docs/bench/gpu-qwen-fp32-{1,16}.json",
    ),
    "llama70b-tp4": Pair(
        "Llama-3-70B-class target / ~1B draft, 4 x H100 tensor-parallel workers (modelled)",
        (),
        5.05,  # the Qwen pair's measured acceptance, for want of a measured 70B pair
        8,
        "modelled: specedge_bench/fleet.py LLAMA_70B_TP4 (H100 spec sheet at stated efficiencies)",
        devices=4,
        modelled=LLAMA_70B_TP4,
    ),
}


def acceptance_for(tokens_per_verify: float, draft_len: int) -> float:
    """The per-token acceptance a at which a chain of `draft_len` emits `tokens_per_verify` on
    average: (1 - a^(k+1)) / (1 - a) (METHOD.md), solved by bisection."""
    low, high = 0.0, 1.0
    for _ in range(60):
        a = (low + high) / 2
        mean = draft_len + 1 if a >= 1 else (1 - a ** (draft_len + 1)) / (1 - a)
        low, high = (a, high) if mean < tokens_per_verify else (low, a)
    return (low + high) / 2


@dataclass(frozen=True)
class FleetConfig:
    mode: str = "specedge"  # or "autoregressive": server-only serving on the same workers
    workers: int = 16
    users: int = 1000  # one who leaves is replaced by a newcomer `away_s` later
    rtt_ms: float = 14.0
    edge_tps: float = 200.0  # each user's device drafting (the bench's --edge-tps on the GPU)
    max_tokens: int = 256  # per reply (the paper's)
    prompt_tokens: int = (
        64  # each turn's new text: with its first verify, or as a prompt when longer than the hub inlines
    )
    long_prompt_tokens: int = 3000  # a pasted document: a prompt fed in chunks beside the verifies
    long_prompt_share: float = 0.0  # the share of turns that bring one instead of `prompt_tokens`
    replies: int = 3  # turns before a user leaves
    think_s: float = 5.0  # mean reading time between replies
    away_s: float = 2.0  # mean gap before a leaving user's place is taken
    slots: int = 1024  # KV slots per worker (sessions it can hold; a 270M target leaves room for many)
    max_batch: int = 64
    max_wait_s: float = 0.002  # `hub_server serve --batch-wait-ms 2`
    merge_share: float = 0.5  # `--merge-wait-share`
    max_pass_tokens: int = 0  # `--max-pass-tokens` (0: the budget measured as the hub measures it)
    device: str = "cuda"  # what a pass costs beyond its tokens (`scheduler.PASS_OVERHEAD_TOKENS`)
    widest_row: int = 65  # the widest verify row a pass is built for: a compiled GPU's, 1 + --max-draft-tokens 64
    duration_s: float = 40.0  # virtual seconds
    warmup_s: float = 10.0  # not counted: the population settles
    seed: int = 0
    server_price_per_hour: float = SERVER_PRICE_PER_HOUR
    edge_price_per_hour: float = EDGE_PRICE_PER_HOUR


class Clock:
    """Virtual time and the events due in it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(when, self.now), next(self._order), action))

    def run_until(self, end: float) -> None:
        while self._events and self._events[0][0] <= end:
            self.now, _, action = heapq.heappop(self._events)
            action()
        self.now = end


FEED_CHUNK = 128  # the runner's: a fed context goes in passes of at most this many tokens


@dataclass
class Job:
    """A verify as the scheduler sees it (`engine_api.VerifyJob`'s pending context, its last
    token included, and its draft); the tokens themselves do not matter here, only how many."""

    pending: list[int]
    draft: list[int]

    @classmethod
    def of(cls, pending: int, draft: int) -> Job:
        return cls([0] * pending, [0] * draft)


@dataclass(frozen=True)
class StepRecord:
    """One step a worker ran: when and how long, its verify pass (sessions, and the tokens they
    brought), the contexts fed apart before it (tokens each), and its prompt chunks (the prompt,
    tokens)."""

    at: float
    seconds: float  # on the device, all its passes
    sessions: int
    verify_tokens: int
    fed_apart: tuple[int, ...]
    chunks: tuple[tuple[Prompt, int], ...]


class SimWorker:
    """One engine worker: the hub's scheduler in virtual time, and a device that costs `costs`."""

    def __init__(self, worker_id: str, clock: Clock, costs: PassCosts, config: FleetConfig):
        self.worker_id = worker_id
        self.clock = clock
        self.costs = costs
        self.fit = PassCostFit()
        self.budget = PromptBudget(config.max_pass_tokens)
        self.scheduler = Scheduler(
            _unused,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_s,
            merge_share=config.merge_share,
            pass_fixed_s=self.fit.fixed_s,
            clock=lambda: clock.now,
            worker=False,
            prompt_budget=self.budget,
            on_pass=self._waited,
            composition=Composition.of(config.device, config.widest_row),
        )
        self.slots = config.slots
        self.sessions = 0
        self.busy = False
        self._wakes: set[float] = set()
        self.tally = WorkerTally()
        self.steps: list[StepRecord] = []
        self.verify_waits: list[float] = []  # each verify's time queued before its step, once counting

    def load(self) -> WorkerLoad:
        return WorkerLoad(self.worker_id, READY, self.slots - self.sessions, self.scheduler.queue_depth)

    def submit(self, job: Job, key: Any = None, announcement: Any = None) -> Future:
        future = self.scheduler.submit(job, announcement=announcement, key=key)
        self.kick()
        return future

    def submit_prompt(self, user: Any, tokens: int) -> Prompt:
        """A prompt of `tokens` for `user`'s session, fed in chunks beside the verifies."""
        prompt = self.scheduler.submit_prompt(user, tokens)
        self.kick()
        return prompt

    def kick(self) -> None:
        """Start the next step if the scheduler says so, or look again when it asks to."""
        if self.busy:
            return
        step = self.scheduler.poll()
        if isinstance(step, Step):
            self.busy = True
            self._run(step)
        elif step is not None and step not in self._wakes:
            self._wakes.add(step)
            self.clock.at(step, lambda: self._wake(step))

    def _wake(self, at: float) -> None:
        self._wakes.discard(at)
        self.kick()

    def _run(self, step: Step) -> None:
        """The step's passes one after another, as the hub's worker runs them: the contexts fed
        apart, the verify pass (its futures resolve as it ends), then each prompt chunk."""
        start = at = self.clock.now
        brought = sum(len(job.pending) + len(job.draft) for job in step.batch)
        fed = tuple(len(job.pending) - 1 for job in step.apart)
        for job in step.apart:
            at += self._fed(at, len(job.pending) - 1)
            job.pending = job.pending[-1:]
        if step.batch:
            # Every row padded to the widest, as the runner lays a pass out.
            tokens = len(step.batch) * max(len(job.pending) + len(job.draft) for job in step.batch)
            seconds = self.costs.seconds(len(step.batch), tokens)
            self.tally.add_pass(at, seconds, len(step.batch))
            at += seconds
            self.clock.at(at, functools.partial(self._verified, tokens, seconds))
        for prompt, size in step.chunks:
            seconds = self._fed(at, size)
            at += seconds
            self.clock.at(at, functools.partial(self._chunk_in, prompt, size, seconds))
        self.clock.at(at, self._step_done)
        self.steps.append(StepRecord(start, at - start, len(step.batch), brought, fed, tuple(step.chunks)))

    def _waited(self, waits: list[float]) -> None:
        if self.clock.now >= self.tally.counting_from:
            self.verify_waits.extend(waits)

    def _fed(self, at: float, tokens: int) -> float:
        """Device seconds to feed `tokens` of one session's context, in passes as the runner feeds it."""
        seconds = sum(self.costs.seconds(1, min(FEED_CHUNK, tokens - start)) for start in range(0, tokens, FEED_CHUNK))
        self.tally.add_busy(at, seconds)
        return seconds

    def _verified(self, tokens: int, seconds: float) -> None:
        self.fit.add(tokens, seconds)  # as the runner feeds the fit its real passes
        self.budget.record_verify(seconds)  # as the hub's worker tells its budget
        self.scheduler.finish()

    def _chunk_in(self, prompt: Prompt, tokens: int, seconds: float) -> None:
        self.budget.record_chunk(tokens, seconds)
        self.tally.prompt_tokens += tokens if self.clock.now >= self.tally.counting_from else 0
        self.scheduler.chunk_done(prompt, tokens)

    def _step_done(self) -> None:
        self.busy = False
        self.kick()


def _unused(jobs: list[Any]) -> None:
    raise AssertionError("a simulated worker's passes are run by the simulation, not by the scheduler")


@dataclass
class WorkerTally:
    counting_from: float = math.inf
    busy_s: float = 0.0
    passes: int = 0
    sessions_in_passes: int = 0
    tokens: int = 0  # emitted to its users
    prompt_tokens: int = 0  # fed as prompt chunks

    def add_pass(self, now: float, seconds: float, sessions: int) -> None:
        if now >= self.counting_from:
            self.busy_s += seconds
            self.passes += 1
            self.sessions_in_passes += sessions

    def add_busy(self, now: float, seconds: float) -> None:
        """Device time that is no verify pass: contexts fed apart, prompt chunks."""
        if now >= self.counting_from:
            self.busy_s += seconds


@dataclass
class Fleet:
    config: FleetConfig
    clock: Clock
    workers: list[SimWorker]
    rng: random.Random
    acceptance: float  # each draft token's chance to be accepted
    draft_len: int
    itl_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    emitted: int = 0
    edge_busy_s: float = 0.0
    refused: int = 0  # arrivals that found every worker full (429 hub_full), retried later
    long_prompts: int = 0  # turns that brought a long prompt
    held: list[float] = field(default_factory=list)  # sessions per worker, sampled each second

    @property
    def counting(self) -> bool:
        return self.clock.now >= self.config.warmup_s

    def place(self) -> SimWorker | None:
        order = placement_order(worker.load() for worker in self.workers)
        return self.workers[int(order[0])] if order else None


class SimUser:
    """One user: arrives, opens a session on the worker placement picks, asks `replies` replies
    (SpecEdge: drafts on its own device, the hub verifies; autoregressive: the hub decodes alone
    and streams), thinks between them, leaves; a newcomer takes its place."""

    def __init__(self, fleet: Fleet, user_id: int):
        self.fleet, self.user_id = fleet, user_id
        self.config = fleet.config
        self.worker: SimWorker | None = None

    def arrive(self) -> None:
        self.worker = self.fleet.place()
        if self.worker is None:
            self.fleet.refused += 1
            self.fleet.clock.at(self.fleet.clock.now + 1.0, self.arrive)
            return
        self.worker.sessions += 1
        self._reply(left=self.config.replies)

    def _reply(self, left: int) -> None:
        start = self.fleet.clock.now
        config = self.config
        text = config.prompt_tokens
        if config.long_prompt_share and self.fleet.rng.random() < config.long_prompt_share:
            text = config.long_prompt_tokens
            self.fleet.long_prompts += 1 if self.fleet.counting else 0
        if config.mode == "specedge":
            self._step(left, start, step_start=start, produced=0, pending=text)
        else:
            self.fleet.clock.at(start + self._half_rtt(), lambda: self._generate(left, start, text))

    def _half_rtt(self) -> float:
        return self.config.rtt_ms / 2000

    # SpecEdge: draft on the edge, verify on the hub, the round trip in between.
    def _step(self, left: int, start: float, step_start: float, produced: int, pending: int) -> None:
        room = self.config.max_tokens - produced - 1
        draft = min(self.fleet.draft_len, max(room, 0))
        drafting = draft / self.config.edge_tps
        if self.fleet.counting:
            self.fleet.edge_busy_s += drafting
        sent = self.fleet.clock.now + drafting
        self.fleet.clock.at(
            sent + self._half_rtt(), lambda: self._verify(left, start, step_start, produced, pending, draft)
        )

    def _verify(self, left: int, start: float, step_start: float, produced: int, pending: int, draft: int) -> None:
        """The hub takes a verify that brings `pending` new tokens (after the last one it has)."""
        assert self.worker is not None
        if pending > INLINE_PROMPT_TOKENS:  # the hub feeds it as a prompt first, then verifies
            self._after_prompt(pending, lambda: self._verify(left, start, step_start, produced, 0, draft))
            return
        future = self.worker.submit(Job.of(pending + 1, draft), key=self.user_id)
        future.add_done_callback(
            lambda _: self.fleet.clock.at(
                self.fleet.clock.now + self._half_rtt(),
                lambda: self._replied(left, start, step_start, produced, self._emitted(draft)),
            )
        )

    def _after_prompt(self, tokens: int, then: Callable[[], None]) -> None:
        """Queue `tokens` of this session's context as a prompt; `then` once all of it is in."""
        assert self.worker is not None
        prompt = self.worker.submit_prompt(self.user_id, tokens)
        prompt.future.add_done_callback(lambda _: self.fleet.clock.at(self.fleet.clock.now, then))

    def _emitted(self, draft: int) -> int:
        accepted = 0
        while accepted < draft and self.fleet.rng.random() < self.fleet.acceptance:
            accepted += 1
        return accepted + 1

    def _replied(self, left: int, start: float, step_start: float, produced: int, emitted: int) -> None:
        emitted = min(emitted, self.config.max_tokens - produced)
        self._record(start, step_start, emitted, first=produced == 0)
        produced += emitted
        if produced < self.config.max_tokens:
            self._step(left, start, self.fleet.clock.now, produced, pending=0)
        else:
            self._reply_done(left)

    # Server-only: the hub decodes one token a pass, staying announced for the generation's life.
    def _generate(self, left: int, start: float, text: int) -> None:
        assert self.worker is not None
        if text > INLINE_PROMPT_TOKENS:  # the generation brings its prompt up first
            self._after_prompt(text, lambda: self._generate(left, start, 0))
            return
        # The hub's generate loop holds `with scheduler.announce()` for the generation's life; in
        # virtual time that life spans many events, so the context is entered and left by hand.
        announcing = self.worker.scheduler.announce()
        announcement = announcing.__enter__()
        self._generate_step(left, start, announcing, announcement, produced=0, step_start=start, text=text)

    def _generate_step(
        self,
        left: int,
        start: float,
        announcing: Any,
        announcement: Any,
        produced: int,
        step_start: float,
        text: int = 0,
    ) -> None:
        assert self.worker is not None
        future = self.worker.submit(Job.of(text + 1, 0), announcement=announcement)

        def done(_: Future) -> None:
            now = self.fleet.clock.now
            # The token streams to the user half a round trip later; the hub goes on at once.
            arrives = now + self._half_rtt()
            self.fleet.clock.at(arrives, lambda: self._record(start, step_start, 1, first=produced == 0))
            if produced + 1 < self.config.max_tokens:
                self.fleet.clock.at(
                    now, lambda: self._generate_step(left, start, announcing, announcement, produced + 1, arrives)
                )
            else:
                announcing.__exit__(None, None, None)
                self.fleet.clock.at(arrives, lambda: self._reply_done(left))

        future.add_done_callback(done)

    def _record(self, start: float, step_start: float, emitted: int, first: bool) -> None:
        now = self.fleet.clock.now
        if not self.fleet.counting:
            return
        assert self.worker is not None
        self.fleet.emitted += emitted
        self.worker.tally.tokens += emitted
        if first:
            self.fleet.ttft_ms.append(1000 * (now - start))
        else:
            self.fleet.itl_ms.extend([1000 * (now - step_start) / emitted] * emitted)

    def _reply_done(self, left: int) -> None:
        if left > 1:
            think = self.fleet.rng.expovariate(1 / self.config.think_s)
            self.fleet.clock.at(self.fleet.clock.now + think, lambda: self._reply(left - 1))
            return
        assert self.worker is not None
        self.worker.sessions -= 1
        self.worker.scheduler.forget(self.user_id)
        newcomer = SimUser(self.fleet, self.user_id + self.config.users)
        self.fleet.clock.at(self.fleet.clock.now + self.fleet.rng.expovariate(1 / self.config.away_s), newcomer.arrive)


def simulate(config: FleetConfig, pair: Pair) -> dict:
    """Run the fleet for `config.duration_s` virtual seconds; its figures after the warm-up."""
    return _figures(run(config, pair), pair, pair.costs)


def run(config: FleetConfig, pair: Pair) -> Fleet:
    """The fleet after `config.duration_s` virtual seconds (its workers' steps in `steps`)."""
    clock = Clock()
    workers = [SimWorker(str(i), clock, pair.costs, config) for i in range(config.workers)]
    acceptance = acceptance_for(pair.tokens_per_verify, pair.draft_len)
    fleet = Fleet(config, clock, workers, random.Random(config.seed), acceptance, pair.draft_len)
    for worker in workers:
        worker.tally.counting_from = config.warmup_s
    for user_id in range(config.users):  # the first users arrive over the first two seconds
        clock.at(fleet.rng.uniform(0, 2.0), SimUser(fleet, user_id).arrive)
    _sample_sessions(fleet)
    clock.run_until(config.duration_s)
    return fleet


def _sample_sessions(fleet: Fleet) -> None:
    if fleet.counting:
        fleet.held.extend(worker.sessions for worker in fleet.workers)
    fleet.clock.at(fleet.clock.now + 1.0, lambda: _sample_sessions(fleet))


def _figures(fleet: Fleet, pair: Pair, costs: PassCosts) -> dict:
    config = fleet.config
    counted_s = config.duration_s - config.warmup_s
    busy = [w.tally.busy_s for w in fleet.workers]
    tokens = [w.tally.tokens for w in fleet.workers]
    passes = sum(w.tally.passes for w in fleet.workers)
    # Paid by the GPU: a tensor-parallel worker's hour is its GPUs' hours.
    server_hours_busy = sum(busy) / 3600 * pair.devices
    server_hours_rented = config.workers * pair.devices * counted_s / 3600
    edge_usd = fleet.edge_busy_s / 3600 * config.edge_price_per_hour
    per_million = 1e6 / fleet.emitted if fleet.emitted else 0.0
    return {
        "mode": config.mode,
        "pair": pair.name,
        "workers": config.workers,
        "gpus": config.workers * pair.devices,
        "users": config.users,
        "rtt_ms": config.rtt_ms,
        "emitted_tokens": fleet.emitted,
        "server_throughput": fleet.emitted / sum(busy) if sum(busy) else 0.0,  # tokens / busy worker-s
        "tokens_per_busy_gpu_s": fleet.emitted / sum(busy) / pair.devices if sum(busy) else 0.0,
        "fleet_tokens_per_s": fleet.emitted / counted_s,
        "itl_ms_p50": _quantile(fleet.itl_ms, 0.5),
        "itl_ms_p95": _quantile(fleet.itl_ms, 0.95),
        "ttft_ms_p50": _quantile(fleet.ttft_ms, 0.5),
        "verify_wait_ms_p99": 1000 * _quantile([wait for w in fleet.workers for wait in w.verify_waits], 0.99),
        "sessions_per_pass": sum(w.tally.sessions_in_passes for w in fleet.workers) / passes if passes else 0.0,
        "busy_fraction": sum(busy) / (config.workers * counted_s),
        # Balance: how evenly placement spread the work (1.0 = perfectly even).
        "worker_tokens_max_over_mean": max(tokens) / statistics.fmean(tokens) if any(tokens) else 0.0,
        "worker_busy_max_over_mean": max(busy) / statistics.fmean(busy) if any(busy) else 0.0,
        "sessions_per_worker_mean": statistics.fmean(fleet.held) if fleet.held else 0.0,
        "sessions_per_worker_stdev": statistics.pstdev(fleet.held) if fleet.held else 0.0,
        "refused_arrivals": fleet.refused,
        "long_prompts": fleet.long_prompts,
        "prompt_tokens_in_chunks": sum(w.tally.prompt_tokens for w in fleet.workers),
        "edge_busy_s": fleet.edge_busy_s,
        # Cost per million tokens: server time as busy time (as the bench counts it: a shared
        # fleet serves others while idle) and as rented time (every worker paid for all along).
        "server_usd_per_million_tokens_busy": per_million * server_hours_busy * config.server_price_per_hour,
        "edge_usd_per_million_tokens": per_million * edge_usd,
        "usd_per_million_tokens_busy": per_million * (server_hours_busy * config.server_price_per_hour + edge_usd),
        "usd_per_million_tokens_rented": per_million * (server_hours_rented * config.server_price_per_hour + edge_usd),
        "pass_costs_ms": {
            "fixed": round(1000 * costs.fixed_s, 3),
            "per_session": round(1000 * costs.per_session_s, 4),
            "per_token": round(1000 * costs.per_token_s, 5),
        },
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def with_users(config: FleetConfig, users_per_worker: int) -> FleetConfig:
    """The same fleet holding `users_per_worker` users on each worker."""
    return replace(config, users=users_per_worker * config.workers)
