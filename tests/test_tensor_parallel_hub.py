"""A hub whose one worker spans two CPU ranks (`--tensor-parallel 2`, gloo, real Ray processes
placed together by a placement group): replies through the real client equal the target alone,
greedy and seeded, several sessions at once; operators see both ranks' devices and processes;
a rank killed mid-reply costs no reply (the group restarts together and the client rebuilds its
session); a rank that hangs is killed and the group restarts; a group no node can hold fails the
start with one line saying what is missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient
from tests.conftest import RunningHub
from tests.replies import ask_disturbed, conversation, expected, pid_alive, wait_for, workers_of
from tests.test_ray_workers import cpu_seconds

ray = pytest.importorskip("ray")

PROMPTS = ["once upon a time there was", "the cat sat on", "a little bird"]
START_S = 600  # Ray and two ranks loading on a shared two-core machine
IDLE_WINDOW_S = 5


@pytest.fixture(scope="module")
def tp_hub(tiny, tmp_path_factory) -> Iterator[RunningHub]:
    hub = RunningHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("tp-hub"),
        *("--tensor-parallel", "2", "--device", "cpu", "--max-draft-tokens", "16"),
        ready_timeout_s=START_S,
    )
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def draft(tiny) -> DraftEngine:
    return DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)  # imperfect: rejections happen


def test_replies_of_several_sessions_at_once_equal_the_target_alone(tp_hub, tiny, target_alone):
    temperatures = (0.0, 0.0, 0.9)

    def ask(prompt: str, temperature: float):
        own_draft = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)  # a llama.cpp context per thread
        with HubClient(tp_hub.url) as client:
            chat = conversation(own_draft, client, temperature)
            try:
                return own_draft, chat.ask(prompt)
            finally:
                chat.close()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(ask, PROMPTS, temperatures))
    for (own_draft, reply), temperature in zip(replies, temperatures):
        assert reply.token_ids == expected(target_alone, own_draft, reply, temperature)
    assert workers_of(tp_hub.url)[0]["passes"] > 0


def test_operators_see_both_ranks_devices_processes_and_shard_layout_and_idle_ranks_sleep(tp_hub):
    (worker,) = workers_of(tp_hub.url)
    assert worker["devices"] == ["cpu", "cpu"] and len(set(worker["pids"])) == 2
    assert worker["pids"][0] == worker["pid"] and all(pid_alive(pid) for pid in worker["pids"])
    before = [cpu_seconds(pid) for pid in worker["pids"]]
    time.sleep(IDLE_WINDOW_S)
    used = [cpu_seconds(pid) - spent for pid, spent in zip(worker["pids"], before)]
    # Rank 1 waits for rank 0's next pass blocked in gloo, not spinning; rank 0 answers probes.
    assert all(seconds < 0.05 * IDLE_WINDOW_S for seconds in used), used
    page = httpx.get(f"{tp_hub.url}/metrics", timeout=30).text
    assert 'specedge_engine_devices{device="cpu",rank="0"} 1.0' in page
    assert 'specedge_engine_devices{device="cpu",rank="1"} 1.0' in page
    log = tp_hub.log.read_text()
    assert "worker 0 ready: 2 devices (cpu, cpu)" in log and "query heads 0-1 of 4" in log


def test_a_rank_killed_mid_reply_costs_no_reply_and_the_group_restarts_together(tp_hub, draft, target_alone):
    before = workers_of(tp_hub.url)[0]

    def kill_rank_1() -> None:
        os.kill(workers_of(tp_hub.url)[0]["pids"][1], signal.SIGKILL)

    reply, reconnects = ask_disturbed(tp_hub.url, draft, PROMPTS[1], kill_rank_1, temperature=0.9, reconnect_s=START_S)
    assert reconnects >= 1
    assert reply.token_ids == expected(target_alone, draft, reply, 0.9)

    def back() -> bool:
        worker = workers_of(tp_hub.url)[0]
        return worker["state"] == "ready" and worker["restarts"] >= 1 and worker["pid"] != before["pid"]

    wait_for(back, START_S, "the group restarting")
    after = workers_of(tp_hub.url)[0]
    assert not set(after["pids"]) & set(before["pids"])  # both ranks are new processes
    assert all(pid_alive(pid) for pid in after["pids"]) and not any(pid_alive(pid) for pid in before["pids"])


def test_a_rank_that_hangs_is_killed_and_the_group_restarts_together(tp_hub):
    def up() -> bool:
        worker = workers_of(tp_hub.url)[0]
        return worker["state"] == "ready" and all(pid_alive(pid) for pid in worker["pids"])

    wait_for(up, START_S, "the worker up with live ranks")
    before, stores = workers_of(tp_hub.url)[0], group_stores()
    os.kill(before["pids"][1], signal.SIGSTOP)  # alive, answering nothing
    try:
        wait_for(lambda: workers_of(tp_hub.url)[0]["restarts"] > before["restarts"], START_S, "the group restarting")
        wait_for(up, START_S, "the worker back")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before["pids"][1], signal.SIGCONT)
    after = workers_of(tp_hub.url)[0]
    assert not set(after["pids"]) & set(before["pids"])
    assert not pid_alive(before["pids"][1])  # rank 0 had the silent rank killed
    # The new group formed through a file of its own, and removed the one the group before used.
    assert len(group_stores() - stores) == 1 and stores - group_stores()


def group_stores() -> set[Path]:
    """The files tensor-parallel groups on this machine formed through."""
    return set(Path(tempfile.gettempdir()).glob("specedge-tensor-parallel-*"))


def test_a_group_no_node_can_hold_fails_the_start_saying_what_is_missing(tiny, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        with pytest.raises(RuntimeError, match="--tensor-parallel 2 needs 2 CPUs on one node") as failed:
            RunningHub(
                tiny.hf_dir,
                tmp_path,
                *("--tensor-parallel", "2", "--device", "cpu", "--ray-address", cluster.address),
                ready_timeout_s=START_S,
            )
        assert "the largest node of the Ray cluster has 1" in str(failed.value)
    finally:
        cluster.shutdown()
