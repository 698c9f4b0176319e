"""The verify scheduler with simulated forward passes: batching, bounded waits, fairness."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest

from hub_server.pass_cost import PassCostFit, RowCosts
from hub_server.scheduler import PASS_OVERHEAD_TOKENS, Composition, Scheduler, Step, feed_apart, finished


class SimulatedRunner:
    """Stands in for the device: each batch takes a fixed time and is recorded."""

    def __init__(self, seconds_per_batch: float):
        self.seconds_per_batch = seconds_per_batch
        self.batches: list[list[str]] = []

    def __call__(self, jobs: list[str]) -> None:
        self.batches.append(list(jobs))
        time.sleep(self.seconds_per_batch)


def test_a_lone_request_with_nothing_on_its_way_does_not_wait():
    runner = SimulatedRunner(0.0)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=60)  # a wait would time the result out
    assert scheduler.submit("a").result(timeout=5) == "a"
    assert runner.batches == [["a"]]
    scheduler.stop()


def test_a_batch_waits_for_an_announced_job():
    runner = SimulatedRunner(0.0)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=60)
    with scheduler.announce():  # a caller preparing "b" (e.g. the hub drafting)
        first = scheduler.submit("a")
        time.sleep(0.05)
        second = scheduler.submit("b")
    assert [first.result(timeout=5), second.result(timeout=5)] == ["a", "b"]
    assert runner.batches == [["a", "b"]]
    scheduler.stop()


def test_the_wait_for_announced_jobs_is_bounded():
    runner = SimulatedRunner(0.0)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=0.05)
    with scheduler.announce():  # announced, but never submitted while "a" waits
        assert scheduler.submit("a").result(timeout=5) == "a"
    assert runner.batches == [["a"]]
    scheduler.stop()


def test_requests_arriving_during_a_batch_form_the_next_batch():
    runner = SimulatedRunner(0.2)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=0.0)
    first = scheduler.submit("first")
    time.sleep(0.05)  # "first" is now on the device
    rest = [scheduler.submit(f"user{i}") for i in range(5)]
    for future in [first, *rest]:
        future.result(timeout=5)
    assert runner.batches == [["first"], [f"user{i}" for i in range(5)]]
    scheduler.stop()


def test_batches_never_exceed_max_batch_and_keep_arrival_order():
    runner = SimulatedRunner(0.05)
    scheduler = Scheduler(runner, max_batch=3, max_wait_s=0.0)
    blocker = scheduler.submit("blocker")
    time.sleep(0.01)
    futures = [scheduler.submit(i) for i in range(10)]
    for future in [blocker, *futures]:
        future.result(timeout=5)
    flat = [job for batch in runner.batches[1:] for job in batch]
    assert flat == list(range(10))
    assert all(len(batch) <= 3 for batch in runner.batches)
    scheduler.stop()


def test_no_session_starves_under_constant_load():
    """Eight simulated users loop submit -> wait -> 'draft' for a while; every one progresses."""
    runner = SimulatedRunner(0.01)
    scheduler = Scheduler(runner, max_batch=4, max_wait_s=0.002)
    done = {user: 0 for user in range(8)}
    deadline = time.monotonic() + 1.0

    def user_loop(user: int) -> None:
        while time.monotonic() < deadline:
            scheduler.submit(user).result(timeout=5)
            done[user] += 1
            time.sleep(0.005)  # drafting on the edge

    threads = [threading.Thread(target=user_loop, args=(u,)) for u in done]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    scheduler.stop()
    assert min(done.values()) > 0.5 * max(done.values())
    assert max(len(batch) for batch in runner.batches) > 1  # users were batched together


def test_a_failing_batch_reports_to_its_callers_and_the_worker_survives():
    def explode(jobs):
        if "bad" in jobs:
            raise ValueError("device error")

    scheduler = Scheduler(explode, max_batch=1, max_wait_s=0.0)
    bad = scheduler.submit("bad")
    try:
        bad.result(timeout=5)
        raise AssertionError("expected the batch error")
    except ValueError as exc:
        assert "device error" in str(exc)
    assert scheduler.submit("good").result(timeout=5) == "good"
    scheduler.stop()


def test_generations_announced_for_their_life_share_the_next_pass():
    """Two hub-side generations: after each pass both come back (one a little later), and the
    next pass waits for the later one instead of running the earlier one alone."""
    runner = SimulatedRunner(0.0)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=5)
    both_started = threading.Barrier(2)

    def generation(name: str, steps: int, pause_s: float) -> None:
        with scheduler.announce() as announcement:
            both_started.wait()
            for step in range(steps):
                time.sleep(pause_s)  # streaming the chunk, drafting the next step
                scheduler.submit(f"{name}{step}", announcement).result(timeout=10)

    threads = [threading.Thread(target=generation, args=(name, 3, pause)) for name, pause in (("a", 0.0), ("b", 0.05))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runner.batches == [["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]
    scheduler.stop()


def test_a_finished_generation_is_not_waited_for():
    runner = SimulatedRunner(0.0)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=60)  # a wait would time the result out
    with scheduler.announce() as announcement:
        scheduler.submit("last step", announcement).result(timeout=5)
    assert scheduler.submit("another user").result(timeout=5) == "another user"
    scheduler.stop()


def test_the_pass_cost_fit_splits_a_pass_into_its_fixed_part_and_a_part_per_token():
    fit = PassCostFit()
    fit.add(36, 0.30)
    assert fit.fixed_s() is None  # one pass size says nothing about the split
    for tokens in (9, 18, 36, 72):  # a CPU: reading the weights, then every token
        fit.add(tokens, 0.16 + 0.0067 * tokens)
    assert abs(fit.fixed_s() - 0.16) < 0.02 and abs(fit.per_token_s() - 0.0067) < 0.0005
    flat = PassCostFit()  # a GPU: a pass costs its launches, whatever it holds
    for tokens in (1, 72, 144):
        flat.add(tokens, 0.04)
    assert abs(flat.fixed_s() - 0.04) < 1e-6 and flat.per_token_s() < 1e-9


def test_the_pass_cost_fit_keeps_the_fixed_part_apart_from_what_growing_contexts_cost():
    """Sessions whose contexts grow as a hub fills: passes of more sessions read deeper contexts
    too. On tokens alone the growing reads look like a steeper cost per token (a smaller fixed
    part); with the reads the fit finds the fixed part, and the tokens' cost at the contexts seen."""
    import random

    rng = random.Random(0)
    fixed, per_token, per_read = 0.005, 0.00001, 0.00000002
    with_reads, tokens_alone = PassCostFit(), PassCostFit()
    for step in range(400):
        sessions = rng.randint(1, 16)
        context = 50 + 5 * step + rng.randint(0, 200)  # deeper as the hub runs
        tokens, reads = 9 * sessions, 9 * sessions * (context + 9)
        reads_more = reads * (1 + sessions / 16)  # fuller passes came later: more read
        seconds = fixed + per_token * tokens + per_read * reads_more
        with_reads.add(tokens, seconds, int(reads_more))
        tokens_alone.add(tokens, seconds)
    assert abs(with_reads.fixed_s() - fixed) < 0.0002
    assert abs(tokens_alone.fixed_s() - fixed) > 0.001  # what a fit on tokens alone made of it
    flat = PassCostFit()  # reads that follow the tokens exactly: the fit on tokens, as before
    for tokens in (9, 18, 36, 72):
        flat.add(tokens, 0.16 + 0.0067 * tokens, reads=tokens * 100)
    assert abs(flat.fixed_s() - 0.16) < 0.02


def _returning_user_meets_a_queued_one(
    runner: SimulatedRunner, scheduler: Scheduler, think_s: float, forget: bool = False, newcomer: str = "B"
) -> list[list[str]]:
    """User B verifies, drafts for `think_s`, verifies again, a few times; then `newcomer` (B, or
    a new session) verifies, and during that pass user A queues. Returns the batches from that
    pass on."""
    for step in range(3):
        scheduler.submit(f"b{step}", key="B").result(timeout=5)
        time.sleep(think_s)
    if newcomer != "B":
        scheduler.forget("B")  # B's session closed; the newcomer's opens
    last = scheduler.submit("b3", key=newcomer)
    time.sleep(0.05)  # b3 is on the device
    first = len(runner.batches) - 1
    if forget:
        scheduler.forget("B")
    a = scheduler.submit("a", key="A")
    last.result(timeout=5)
    time.sleep(think_s)
    b = scheduler.submit("b4", key=newcomer)
    a.result(timeout=5)
    b.result(timeout=5)
    scheduler.stop()
    return runner.batches[first:]


def test_a_pass_waits_for_a_user_due_back_within_half_its_fixed_cost():
    """Passes cost 0.2 s whatever they hold; B comes back 0.03 s after each reply, well within
    half of that: the pass that A queued for waits for B instead of running A alone."""
    runner = SimulatedRunner(0.2)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=0.0, merge_share=0.5, pass_fixed_s=lambda: 0.2)
    assert _returning_user_meets_a_queued_one(runner, scheduler, think_s=0.03) == [["b3"], ["a", "b4"]]
    assert scheduler.stats.merge_waits >= 1


def test_a_new_session_is_expected_back_as_soon_as_users_usually_come_back():
    runner = SimulatedRunner(0.2)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=0.0, merge_share=0.5, pass_fixed_s=lambda: 0.2)
    assert _returning_user_meets_a_queued_one(runner, scheduler, think_s=0.03, newcomer="C") == [["b3"], ["a", "b4"]]


def test_users_due_back_later_or_forgotten_are_not_waited_for():
    runner = SimulatedRunner(0.2)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=0.0, merge_share=0.5, pass_fixed_s=lambda: 0.2)
    assert _returning_user_meets_a_queued_one(runner, scheduler, think_s=0.3) == [["b3"], ["a"], ["b4"]]
    runner = SimulatedRunner(0.2)
    scheduler = Scheduler(runner, max_batch=8, max_wait_s=0.0, merge_share=0.5, pass_fixed_s=lambda: 0.2)
    assert _returning_user_meets_a_queued_one(runner, scheduler, think_s=0.03, forget=True) == [["b3"], ["a"], ["b4"]]
    runner = SimulatedRunner(0.2)
    scheduler = Scheduler(
        runner, max_batch=8, max_wait_s=0.0, merge_share=0.0, pass_fixed_s=lambda: 0.2
    )  # switched off
    assert _returning_user_meets_a_queued_one(runner, scheduler, think_s=0.03) == [["b3"], ["a"], ["b4"]]


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_driven_in_virtual_time_it_makes_the_same_decisions_without_a_thread():
    """worker=False: a driver calls poll and finish on its own clock (the fleet simulation)."""
    clock = VirtualTime()
    scheduler = Scheduler(_never, max_batch=8, max_wait_s=0.002, clock=clock, worker=False)
    assert scheduler.poll() is None  # nothing queued
    lone = scheduler.submit("a")
    assert batch_of(scheduler.poll()) == ["a"]  # a lone request goes at once
    clock.now = 0.02
    scheduler.finish()
    assert lone.result(timeout=0) == "a" and scheduler.stats.batches == 1
    with scheduler.announce():
        scheduler.submit("b")
        assert scheduler.poll() == 0.02 + 0.002  # waits for the announced job, until then
        clock.now = 0.021
        scheduler.submit("c")
    assert batch_of(scheduler.poll()) == ["b", "c"]
    scheduler.finish(RuntimeError("device lost"))


def test_in_virtual_time_a_pass_waits_for_a_user_due_back():
    """Passes cost 0.2 s; B comes back 0.03 s after each reply: A's pass waits for B, until B comes."""
    clock = VirtualTime()
    scheduler = Scheduler(
        _never, max_batch=8, max_wait_s=0.0, merge_share=0.5, pass_fixed_s=lambda: 0.2, clock=clock, worker=False
    )
    for step in range(3):  # B's rhythm: a pass, then back 0.03 s later
        scheduler.submit(f"b{step}", key="B")
        assert batch_of(scheduler.poll()) == [f"b{step}"]
        clock.now += 0.2
        scheduler.finish()
        clock.now += 0.03
    scheduler.submit("b3", key="B")
    assert batch_of(scheduler.poll()) == ["b3"]
    clock.now += 0.2
    scheduler.finish()  # B is due back at now + 0.03, within half the fixed 0.2 s
    scheduler.submit("a", key="A")
    held_until = scheduler.poll()
    assert isinstance(held_until, float) and held_until == pytest.approx(clock.now + 0.1)
    clock.now += 0.03
    scheduler.submit("b4", key="B")
    assert batch_of(scheduler.poll()) == ["a", "b4"]
    assert scheduler.stats.merge_waits == 1 and scheduler.stats.merge_wait_seconds == pytest.approx(0.03)


def _never(jobs: list[str]) -> None:
    raise AssertionError("a driven scheduler runs no batch itself")


def batch_of(step: Step | float | None) -> list:
    """The verify batch of a step `poll` handed out."""
    assert isinstance(step, Step), step
    return step.batch


def test_row_costs_interpolate_between_the_counts_measured_and_follow_the_device():
    costs = RowCosts(fade=0.5)
    assert not costs.known()
    for rows, seconds in ((1, 0.070), (2, 0.150), (16, 0.180), (64, 0.550)):
        costs.add(rows, seconds)
    assert costs.known()
    assert costs.seconds(0) == 0.0
    assert costs.seconds(0.5) == pytest.approx(0.035)  # the chance of a call of one row
    assert costs.seconds(2) == pytest.approx(0.150)
    assert costs.seconds(9) == pytest.approx(0.165)  # halfway from 2 to 16
    assert costs.seconds(72) == pytest.approx(0.550 + 8 * (0.370 / 48))  # on the line beyond 64
    costs.add(2, 0.250)  # the device got slower: half way there
    assert costs.seconds(2) == pytest.approx(0.200)


class SimulatedDevice:
    """Verify batches and prompt chunks on one simulated device, in the order they ran."""

    def __init__(self, seconds_per_step: float = 0.0):
        self.seconds_per_step = seconds_per_step
        self.steps: list[tuple[str, object]] = []

    def verify(self, jobs: list[str]) -> None:
        self.steps.append(("verify", list(jobs)))
        time.sleep(self.seconds_per_step)

    def prompt(self, job: str, tokens: int) -> None:
        if job == "broken":
            raise ValueError("device error")
        self.steps.append(("prompt", (job, tokens)))
        time.sleep(self.seconds_per_step)

    def chunks(self, job: str | None = None) -> list[tuple[str, int]]:
        return [detail for kind, detail in self.steps if kind == "prompt" and (job is None or detail[0] == job)]  # type: ignore[misc]


def prompt_scheduler(device: SimulatedDevice, budget: int) -> Scheduler:
    return Scheduler(
        device.verify, max_batch=8, max_wait_s=0.0, run_prompt=device.prompt, prompt_budget=lambda j: budget
    )


def test_a_prompt_goes_in_chunks_of_the_budget_and_verifies_go_between_them():
    device = SimulatedDevice(0.02)
    scheduler = prompt_scheduler(device, budget=100)
    prompt = scheduler.submit_prompt("long", 350)
    time.sleep(0.03)  # its first chunk is on the device
    verify = scheduler.submit("v")
    assert verify.result(timeout=5) == "v" and prompt.future.result(timeout=5) is None
    assert [size for _, size in device.chunks()] == [100, 100, 100, 50]
    # The verify waited for one chunk at most, never for the whole prompt.
    assert device.steps.index(("verify", ["v"])) <= 2
    scheduler.stop()


def test_prompts_take_steps_in_turn_so_none_waits_for_anothers_whole_prefill():
    device = SimulatedDevice(0.05)
    scheduler = prompt_scheduler(device, budget=64)
    blocker = scheduler.submit("blocker")
    time.sleep(0.01)  # on the device while both prompts queue
    first, second = scheduler.submit_prompt("a", 128), scheduler.submit_prompt("b", 128)
    for done in (blocker, first.future, second.future):
        done.result(timeout=5)
    assert device.chunks() == [("a", 64), ("b", 64)] * 2  # they take steps in turn from the first
    scheduler.stop()


def test_a_cancelled_prompt_takes_no_more_chunks_and_a_failing_one_fails_alone():
    device = SimulatedDevice(0.02)
    scheduler = prompt_scheduler(device, budget=16)
    gone = scheduler.submit_prompt("gone", 1600)
    broken = scheduler.submit_prompt("broken", 32)
    fine = scheduler.submit_prompt("fine", 32)
    time.sleep(0.05)
    scheduler.cancel_prompt(gone)
    assert gone.future.result(timeout=5) is None
    with pytest.raises(ValueError, match="device error"):
        broken.future.result(timeout=5)
    assert fine.future.result(timeout=5) is None
    assert sum(size for _, size in device.chunks("gone")) < 1600
    scheduler.stop()


def test_a_long_prompt_is_fed_apart_only_when_it_saves_padding():
    # One new prompt of 100 tokens among three 8-token drafts: 4 x 108 padded tokens, or 99
    # (plus a pass) apart and 4 x 9 in the batch.
    assert feed_apart([(100, 0), (1, 8), (1, 8), (1, 8)], pass_overhead=2) == [0]
    assert feed_apart([(100, 0), (1, 8), (1, 8), (1, 8)], pass_overhead=4096) == []
    assert feed_apart([(100, 8)], pass_overhead=0) == []  # alone, nothing is padded
    assert feed_apart([(10, 8), (1, 8)], pass_overhead=2) == [0]  # 2 x 9 saved for 9 + 2
    assert feed_apart([(10, 8), (1, 8)], pass_overhead=9) == []  # 2 x 9 saved for 9 + 9: no gain
    # Taking out the 80 alone leaves the batch 64 wide; taking out both leaves it 9 wide.
    assert feed_apart([(60, 4), (80, 0), (1, 8)], pass_overhead=2) == [1, 0]
    assert feed_apart([(1, 8), (1, 3)], pass_overhead=0) == []


def test_a_row_wider_than_the_device_builds_passes_for_is_fed_apart_whatever_it_saves():
    gpu = Composition.of("cuda:1", widest_row=9)
    assert gpu.overhead_tokens == PASS_OVERHEAD_TOKENS["cuda"] and Composition.of("cpu", 9).overhead_tokens == 2
    assert gpu.apart([(100, 0), (1, 8), (1, 8)]) == [0]  # not worth a pass, but wider than 9
    assert gpu.apart([(100, 8)]) == [0]  # even alone
    assert gpu.apart([(2, 8), (1, 8)]) == [0]
    assert gpu.apart([(1, 8), (1, 3)]) == []  # a last token and a draft: nothing to take out
    assert Composition(overhead_tokens=2, widest_row=128).apart([(10, 8), (1, 8)]) == [0]  # worth it
    assert Composition(overhead_tokens=2, widest_row=128).apart([(60, 4), (80, 0), (1, 8)]) == [0, 1]


@dataclass
class Row:
    """What composition reads of a verify job: its pending context and its draft."""

    name: str
    pending: list[int]
    draft: list[int] = field(default_factory=lambda: [7] * 8)


class ComposedDevice(SimulatedRunner):
    """Records the feeds apart and the verify passes, as (kind, name, tokens) in the order they ran."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.ran: list[tuple[str, str, int]] = []

    def feed(self, job: Row) -> None:
        if job.name == "broken":
            raise ValueError("device error")
        self.ran.append(("feed", job.name, len(job.pending) - 1))

    def __call__(self, jobs: list[Row]) -> None:
        self.ran += [("verify", job.name, len(job.pending)) for job in jobs]


def test_the_scheduler_feeds_a_rows_context_apart_before_the_pass_it_composed():
    """A new prompt of 100 tokens among three drafts on a CPU: its context but the last token goes
    in a pass of its own first, and the verify pass carries that last token with the others."""
    device = ComposedDevice()
    scheduler = Scheduler(
        device, max_batch=4, max_wait_s=60, composition=Composition.of("cpu", 128), run_feed=device.feed
    )
    with scheduler.announce():  # the four arrive before the batch goes
        futures = [scheduler.submit(Row(name, [1] * size)) for name, size in (("d1", 1), ("new", 100), ("d2", 1))]
        futures.append(scheduler.submit(Row("d3", [1])))
    jobs = [future.result(timeout=5) for future in futures]
    assert device.ran == [("feed", "new", 99)] + [("verify", name, 1) for name in ("d1", "new", "d2", "d3")]
    assert [len(job.pending) for job in jobs] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="a scheduler that takes rows out of a pass needs run_feed"):
        Scheduler(device, composition=Composition.of("cpu", 128))
    scheduler.stop()


def test_a_feed_apart_that_fails_fails_its_batch_and_the_worker_goes_on():
    device = ComposedDevice()
    scheduler = Scheduler(
        device, max_batch=2, max_wait_s=60, composition=Composition.of("cuda", 9), run_feed=device.feed
    )
    with scheduler.announce():
        broken, beside = scheduler.submit(Row("broken", [1] * 20)), scheduler.submit(Row("beside", [1]))
    for future in (broken, beside):
        with pytest.raises(ValueError, match="device error"):
            future.result(timeout=5)
    assert scheduler.submit(Row("next", [1] * 20)).result(timeout=5).pending == [1]
    assert device.ran == [("feed", "next", 19), ("verify", "next", 1)]
    scheduler.stop()


def test_driven_in_virtual_time_a_prompt_takes_the_same_chunks_beside_verifies():
    """The steps `poll` hands a driver (the fleet simulation) are the worker's: a prompt of 350
    tokens at a budget of 100 goes in chunks of 100, 100, 100 and 50, and a verify that arrives
    meanwhile goes in the next step, before that step's chunk."""
    clock = VirtualTime()
    scheduler = Scheduler(_never, max_batch=8, max_wait_s=0.0, clock=clock, worker=False, prompt_budget=lambda j: 100)
    prompt = scheduler.submit_prompt("long", 350)
    first = scheduler.poll()
    assert isinstance(first, Step) and first.batch == [] and first.chunks == [(prompt, 100)]
    verify = scheduler.submit("v")  # while the chunk is on the device
    clock.now += 0.01
    scheduler.chunk_done(prompt, 100)
    second = scheduler.poll()
    assert isinstance(second, Step) and second.batch == ["v"] and second.chunks == [(prompt, 100)]
    scheduler.finish()
    assert verify.result(timeout=0) == "v"
    scheduler.chunk_done(prompt, 100)
    sizes = []
    while not prompt.future.done():
        step = scheduler.poll()
        assert isinstance(step, Step) and step.batch == []
        ((chunk_of, size),) = step.chunks
        sizes.append(size)
        scheduler.chunk_done(chunk_of, size)
    assert sizes == [100, 50] and scheduler.poll() is None


def test_a_verify_whose_batch_waits_for_company_is_not_held_back_by_a_chunk_started_meanwhile():
    """A chunk alone goes only while no verify is queued: a batch waiting for announced jobs (or
    a user due back) waits, and its verifies go first once it may go, the chunk after them."""
    clock = VirtualTime()
    scheduler = Scheduler(_never, max_batch=8, max_wait_s=0.05, clock=clock, worker=False, prompt_budget=lambda j: 100)
    prompt = scheduler.submit_prompt("long", 300)
    with scheduler.announce():  # another job is on its way: the batch of "v" waits for it
        verify = scheduler.submit("v")
        assert scheduler.poll() == 0.05  # not a step of chunks while "v" is queued
        clock.now = 0.01
        scheduler.submit("w")
    step = scheduler.poll()
    assert isinstance(step, Step) and step.batch == ["v", "w"] and step.chunks == [(prompt, 100)]
    scheduler.finish()
    assert verify.result(timeout=0) == "v"
    scheduler.chunk_done(prompt, 100)
    alone = scheduler.poll()  # nothing queued: the prompt goes on by itself
    assert isinstance(alone, Step) and alone.batch == [] and alone.chunks == [(prompt, 100)]


def test_in_virtual_time_users_coming_back_one_by_one_share_one_pass_within_twice_the_window():
    """Four users finish a pass together and come back 0.03, 0.11, 0.19 and 0.27 s later, their
    verifies reaching the engine one after another: the batch waits for each while they keep
    coming (the window, half the fixed 0.2 s, runs from the latest), never more than twice the
    window after the first: D, due 0.24 s after A came, is not waited for."""
    clock = VirtualTime()
    scheduler = Scheduler(
        _never, max_batch=8, max_wait_s=0.0, merge_share=0.5, pass_fixed_s=lambda: 0.2, clock=clock, worker=False
    )
    thinks = {"A": 0.03, "B": 0.11, "C": 0.19, "D": 0.27}
    for user, think in thinks.items():  # each one's rhythm: a pass, then back `think` later
        for step in range(3):
            scheduler.submit(f"{user}{step}", key=user)
            while isinstance(step_now := scheduler.poll(), float):  # held for another user due back
                clock.now = step_now
            assert batch_of(step_now) == [f"{user}{step}"]
            clock.now += 0.2
            scheduler.finish()
            clock.now += think
    clock.now += 1.0  # nobody is due any more
    for user in thinks:
        scheduler.submit(f"{user}-together", key=user)
    assert batch_of(scheduler.poll()) == [f"{user}-together" for user in thinks]
    clock.now += 0.2
    scheduler.finish()
    back = clock.now
    clock.now = back + 0.03
    scheduler.submit("A-back", key="A")
    assert scheduler.poll() == pytest.approx(back + 0.13)  # B is due within the window
    clock.now = back + 0.11
    scheduler.submit("B-back", key="B")
    assert scheduler.poll() == pytest.approx(back + 0.21)  # C too, a window after B came
    clock.now = back + 0.19
    scheduler.submit("C-back", key="C")
    assert batch_of(scheduler.poll()) == ["A-back", "B-back", "C-back"]  # D would come past 0.23


def test_passes_of_nearly_one_size_keep_the_split_the_varied_ones_found():
    """A saturated hub runs passes of 13 to 16 sessions: their times, noise and all, cannot say
    what part is fixed, so the split found while passes varied stands (the merge wait reads it)."""
    fit = PassCostFit()
    for tokens in (9, 18, 36, 72, 144):
        fit.add(tokens, 0.004 + 0.0001 * tokens)
    assert abs(fit.fixed_s() - 0.004) < 0.0005
    noise = random.Random(0)
    for _ in range(500):
        tokens = 9 * noise.randint(13, 16)
        fit.add(tokens, (0.004 + 0.0001 * tokens) * noise.uniform(0.85, 1.15))
    assert abs(fit.fixed_s() - 0.004) < 0.0005 and abs(fit.per_token_s() - 0.0001) < 0.00002


# --- driven by an event loop (the engine process's) -------------------------------------------
async def _with_loop(body) -> None:
    """`body(loop)` with the running loop (`asyncio.run(_with_loop(body))`)."""
    await body(asyncio.get_running_loop())


class LoopDevice:
    """Records, in order, each pass (its jobs and the thread it ran on) and what else happened."""

    def __init__(self):
        self.events: list[tuple[str, Any]] = []
        self.threads: set[int] = set()

    def __call__(self, jobs: list[str]) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(("pass", list(jobs)))


def test_on_an_event_loop_jobs_submitted_in_one_turn_share_one_pass_run_on_the_loop_itself():
    device = LoopDevice()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        scheduler = Scheduler(device, max_batch=8, max_wait_s=60, loop=loop)
        futures = [asyncio.wrap_future(scheduler.submit(job)) for job in "abc"]
        assert await asyncio.gather(*futures) == ["a", "b", "c"]
        scheduler.stop()

    asyncio.run(_with_loop(body))
    assert device.events == [("pass", ["a", "b", "c"])]
    assert device.threads == {threading.get_ident()}  # asyncio.run's loop runs on this thread


def test_on_an_event_loop_a_passs_callers_answer_before_the_next_pass_starts():
    """Work queued during a pass runs next, but only after the pass's callers have had their
    answers (their tasks woke and went on): an answer never waits for a whole further pass."""
    device = LoopDevice()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        scheduler = Scheduler(device, max_batch=8, max_wait_s=0.0, loop=loop)

        def first_pass(jobs: list[str]) -> None:
            device(jobs)
            if jobs == ["a"]:  # while "a" is on the device, "b" comes (from another thread)
                threading.Thread(target=scheduler.submit, args=("b",)).start()
                time.sleep(0.05)

        scheduler._run_batch = first_pass
        await asyncio.wrap_future(scheduler.submit("a"))
        # As the engine process answers: the answer is queued, the frame leaves at the next turn.
        loop.call_soon(device.events.append, ("answered", "a"))
        while len(device.events) < 3:
            await asyncio.sleep(0.01)
        scheduler.stop()

    asyncio.run(_with_loop(body))
    assert device.events == [("pass", ["a"]), ("answered", "a"), ("pass", ["b"])]


def test_on_an_event_loop_a_batch_waits_for_an_announced_job_and_the_wait_is_bounded():
    device = LoopDevice()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        scheduler = Scheduler(device, max_batch=8, max_wait_s=0.2, loop=loop)
        with scheduler.announce():  # "b" comes 50 ms later: "a" waits for it
            first = asyncio.wrap_future(scheduler.submit("a"))
            await asyncio.sleep(0.05)
            second = asyncio.wrap_future(scheduler.submit("b"))
        assert await asyncio.gather(first, second) == ["a", "b"]
        with scheduler.announce():  # announced, never submitted: "c" goes when the wait is up
            started = time.monotonic()
            assert await asyncio.wait_for(asyncio.wrap_future(scheduler.submit("c")), 5) == "c"
            assert time.monotonic() - started >= 0.2
        scheduler.stop()

    asyncio.run(_with_loop(body))
    assert device.events == [("pass", ["a", "b"]), ("pass", ["c"])]


def test_on_an_event_loop_prompts_go_in_chunks_beside_verifies_and_a_failing_pass_fails_its_batch():
    steps: list[tuple[str, Any]] = []

    def verify(jobs: list[str]) -> None:
        steps.append(("verify", list(jobs)))
        if "bad" in jobs:
            raise ValueError("device error")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        scheduler = Scheduler(
            verify,
            max_batch=8,
            max_wait_s=0.0,
            run_prompt=lambda job, size: steps.append(("prompt", (job, size))),
            prompt_budget=lambda jobs: 100,
            loop=loop,
        )
        prompt = scheduler.submit_prompt("long", 250)
        verified = asyncio.wrap_future(scheduler.submit("v"))
        await asyncio.wrap_future(prompt.future)
        assert await verified == "v"
        with pytest.raises(ValueError, match="device error"):
            await asyncio.wrap_future(scheduler.submit("bad"))
        assert await asyncio.wrap_future(scheduler.submit("good")) == "good"
        scheduler.stop()

    asyncio.run(_with_loop(body))
    assert [detail for kind, detail in steps if kind == "prompt"] == [("long", 100), ("long", 100), ("long", 50)]
    assert steps.index(("verify", ["v"])) <= 1  # it waited for one chunk at most
    assert steps[-2:] == [("verify", ["bad"]), ("verify", ["good"])]


def test_on_an_event_loop_a_step_that_raises_past_its_handling_does_not_stop_the_passes():
    told = []

    def on_prompt_step(tokens: int, waits: list[float]) -> None:
        told.append(tokens)
        if len(told) == 1:
            raise RuntimeError("a bug in what a step reports")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(lambda loop, context: told.append(context["message"]))
        scheduler = Scheduler(
            lambda jobs: None,
            max_batch=8,
            max_wait_s=0.0,
            run_prompt=lambda job, size: None,
            prompt_budget=lambda jobs: 100,
            on_prompt_step=on_prompt_step,
            loop=loop,
        )
        scheduler.submit_prompt("first", 50)  # its step raises as it begins
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(asyncio.wrap_future(scheduler.submit("v")), 5) == "v"
        second = scheduler.submit_prompt("second", 50)
        await asyncio.wait_for(asyncio.wrap_future(second.future), 5)
        scheduler.stop()

    asyncio.run(_with_loop(body))
    assert told[0] == 50 and any(isinstance(entry, str) for entry in told)


def test_finished_gives_a_pass_result_or_error_from_the_loop_s_thread_or_another():
    async def scenario() -> None:
        on_the_loop: Future = Future()
        asyncio.get_running_loop().call_soon(on_the_loop.set_result, "job")
        assert await finished(on_the_loop) == "job"

        failed: Future = Future()
        threading.Timer(0.01, failed.set_exception, [RuntimeError("the pass failed")]).start()
        with pytest.raises(RuntimeError, match="the pass failed"):
            await finished(failed)

        done_already: Future = Future()
        done_already.set_result("earlier")
        assert await finished(done_already) == "earlier"

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_the_pass_and_its_callbacks_alone():
    applied: list[str] = []

    async def scenario() -> None:
        running: Future = Future()
        running.add_done_callback(lambda done: applied.append(done.result()))
        waiter = asyncio.ensure_future(finished(running))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not running.cancelled()
        running.set_result("job")  # the pass ends after its caller left: applied, nothing raised
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert applied == ["job"]


def test_a_pass_ending_after_its_loop_closed_raises_nothing_in_the_scheduler_s_thread(caplog):
    """A Ray scheduler's thread may end a pass after the hub's loop has stopped."""
    running: Future = Future()

    async def scenario() -> None:
        waiter = asyncio.ensure_future(finished(running))
        await asyncio.sleep(0)
        waiter.cancel()

    asyncio.run(scenario())  # the loop is closed when this returns
    ender = threading.Thread(target=running.set_result, args=["job"])
    ender.start()
    ender.join()
    assert running.result() == "job"
    assert "exception calling callback" not in caplog.text
