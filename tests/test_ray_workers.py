"""A hub over two engine workers on Ray (real Ray processes, CPU): sessions spread over both,
replies equal the target alone on each, a worker killed mid-reply costs no reply (the chat
client's own recovery reopens the session on the live worker) and comes back; both killed at
once leave the hub up, degraded, until Ray restarts them, and the reply still completes; an idle
hub's processes sleep, and the Ray it starts listens on loopback only; on a Ray cluster of two
nodes the workers sit on both and losing a node re-homes its sessions.

Ray starts once per hub (a module fixture each), with one CPU per worker and no dashboard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_common.grammar import json_schema_grammar
from tests.conftest import AuthHub, RunningHub
from tests.replies import MAX_TOKENS, conversation, expected, pid_alive, wait_for, workers_of
from tests.test_grammar import PAINT, target_under_grammar
from tests.test_lossless import plain_template

ray = pytest.importorskip("ray")

PROMPTS = ["once upon a time there was", "the cat sat on", "a little bird", "in the morning"]
START_S = 600  # Ray and two model loads on a shared two-core machine
IDLE_WINDOW_S = 10


@pytest.fixture(scope="module")
def two_workers(tiny, tmp_path_factory) -> Iterator[AuthHub]:
    """A hub with accounts (ada, bob, and the operator ops) over two CPU workers on a Ray cluster it
    starts itself."""
    hub = AuthHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("ray-hub"),
        ("ada", "bob"),
        *("--workers", "2", "--device", "cpu", "--max-draft-tokens", "16", "--max-sessions-per-user", "4"),
        operators=("ops",),
        ready_timeout_s=START_S,
    )
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def draft(tiny) -> DraftEngine:
    return DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)  # imperfect: rejections happen


# --- the hub's processes, read from /proc ------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process under it (Ray's GCS, raylet, agents and workers are the hub's children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        with_fds = f"/proc/{pid}/fd"
        for fd in os.listdir(with_fds) if os.path.isdir(with_fds) else []:
            with contextlib.suppress(OSError):
                target = os.readlink(f"{with_fds}/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            local, state, inode = columns[1], columns[3], columns[9]
            if state == "0A" and inode in inodes:  # LISTEN
                raw = bytes.fromhex(local.split(":")[0])
                # /proc writes the address as 32-bit words in host order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(socket.inet_ntop(family, words))
    return addresses


def test_an_idle_hub_sleeps_and_its_ray_listens_on_loopback_only(two_workers):
    wait_for(lambda: both_ready(two_workers.url), 300, "both workers ready")  # /health says 200 with one
    time.sleep(3)  # what start-up set going settles
    root = two_workers.process.pid
    before = {pid: cpu_seconds(pid) for pid in process_tree(root)}
    time.sleep(IDLE_WINDOW_S)
    tree = process_tree(root)
    used = {pid: cpu_seconds(pid) - before.get(pid, 0.0) for pid in tree}
    hub = [pid for pid in tree if pid == root or is_engine(pid) or comm(pid).startswith("ray::EngineWork")]
    spent = f"{sum(used.values()):.2f} CPU seconds in {IDLE_WINDOW_S} s, {used}"
    # Ray's compiled graphs kept a core per worker busy polling its channel with no pass to run.
    # The front end, the engine process and its workers: under 5% of a core. With Ray's own daemons (GCS, raylet, log
    # monitor, agents: ~2-3% of Ray's floor, more on a loaded machine) under 10%.
    assert sum(used[pid] for pid in hub) < 0.05 * IDLE_WINDOW_S and len(hub) == 4, spent
    assert sum(used.values()) < 0.10 * IDLE_WINDOW_S, spent
    addresses = listening_addresses(tree)
    assert len(tree) >= 5 and addresses  # the front end, GCS, raylet, both workers at least
    assert addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses


def both_ready(url: str) -> bool:
    answer = httpx.get(f"{url}/health")
    return answer.status_code == 200 and answer.json()["workers"] == {"ready": 2, "total": 2}


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text()


def is_engine(pid: int) -> bool:
    return b"hub_server.engine_process" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_sessions_spread_over_both_workers_and_replies_equal_the_target_alone(two_workers, draft, target_alone):
    health = httpx.get(f"{two_workers.url}/health").json()
    assert health["workers"] == {"ready": 2, "total": 2}
    token = two_workers.tokens["ada"]
    with HubClient(two_workers.url, token=token) as client:
        # Opened one after another while all stay open: greedy and seeded land on each worker.
        chats = [conversation(draft, client, temperature) for temperature in (0.0, 0.0, 0.9, 0.9)]
        try:
            replies = [chat.ask(prompt) for chat, prompt in zip(chats, PROMPTS)]
            placed = workers_of(two_workers.url, two_workers.tokens["ops"])
            assert [w["sessions"] for w in placed] == [2, 2]
            assert len({w["pid"] for w in placed}) == 2 and all(w["passes"] > 0 for w in placed)
        finally:
            for chat in chats:
                chat.close()
    for reply, temperature in zip(replies, (0.0, 0.0, 0.9, 0.9)):
        assert reply.token_ids == expected(target_alone, draft, reply, temperature)


def test_grammars_and_logprobs_reach_the_acceptance_rule_on_both_workers(two_workers, draft, target_alone):
    """The engine process computes a verify's masks where the session lives; they cross to the
    worker with the pass, and the logprobs come back with its results."""
    grammar = json_schema_grammar(PAINT)
    token = two_workers.tokens["ada"]
    settings = [
        DecodeSettings(max_tokens=MAX_TOKENS, temperature=t, seed=7, draft_len=3, grammar=grammar, top_logprobs=1)
        for t in (0.0, 0.0, 0.9, 0.9)
    ]
    with HubClient(two_workers.url, token=token) as client:
        chats = [Conversation(draft, client, plain_template(draft), s) for s in settings]
        try:
            replies = [chat.ask(prompt) for chat, prompt in zip(chats, PROMPTS)]
            assert [w["sessions"] for w in workers_of(two_workers.url, two_workers.tokens["ops"])] == [2, 2]
        finally:
            for chat in chats:
                chat.close()
    for reply, s in zip(replies, settings):
        context = reply.prompt_token_ids
        assert reply.token_ids == target_under_grammar(
            target_alone, draft, context, grammar, MAX_TOKENS, s.temperature, 7
        )
        first = torch.log_softmax(target_alone.next_logits(context).double(), dim=-1)
        assert reply.logprobs[0].logprob == pytest.approx(float(first[reply.token_ids[0]]), abs=1e-4)


def test_limits_and_ownership_hold_across_workers(two_workers):
    ada, bob = two_workers.client("ada"), two_workers.client("bob")
    assert ada.get("/v1/workers").status_code == 403  # the workers list is the operators'
    info = ada.get("/v1/info").json()
    body = {k: info[k] for k in ("protocol_version", "vocab_size", "vocab_fingerprint")}
    sessions = [ada.post("/v1/sessions", json=body).json()["session_id"] for _ in range(4)]
    try:
        refused = ada.post("/v1/sessions", json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limited")
        assert sorted(w["sessions"] for w in workers_of(two_workers.url, two_workers.tokens["ops"])) == [2, 2]
        for session in sessions:  # on either worker, ada's session is unknown to bob
            answer = bob.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 2]})
            assert (answer.status_code, answer.json()["error"]["code"]) == (404, "session_not_found")
            assert bob.delete(f"/v1/sessions/{session}").status_code == 404
    finally:
        for session in sessions:
            ada.delete(f"/v1/sessions/{session}")


def test_a_worker_killed_mid_reply_costs_no_reply_and_comes_back(two_workers, draft, target_alone):
    token = two_workers.tokens["ada"]
    rounds = {"n": 0}
    killed: list[dict] = []

    def kill_its_worker(tokens: list[int]) -> None:
        rounds["n"] += 1
        if rounds["n"] == 2:
            holder = next(w for w in workers_of(two_workers.url, two_workers.tokens["ops"]) if w["sessions"])
            os.kill(holder["pid"], signal.SIGKILL)
            killed.append(holder)

    with HubClient(two_workers.url, token=token) as client:
        chat = conversation(draft, client, 0.9)
        try:
            reply = chat.ask(PROMPTS[0], on_tokens=kill_its_worker)
            assert killed and chat.reconnects >= 1
        finally:
            chat.close()
    assert reply.token_ids == expected(target_alone, draft, reply, 0.9)

    lost_id = killed[0]["worker_id"]

    def back() -> bool:
        worker = next(w for w in workers_of(two_workers.url, two_workers.tokens["ops"]) if w["worker_id"] == lost_id)
        return worker["state"] == "ready" and worker["restarts"] >= 1 and worker["pid"] != killed[0]["pid"]

    wait_for(back, 300, f"worker {lost_id} restarting")
    ada = two_workers.client("ada")
    info = ada.get("/v1/info").json()
    body = {k: info[k] for k in ("protocol_version", "vocab_size", "vocab_fingerprint")}
    opened = [ada.post("/v1/sessions", json=body).json()["session_id"] for _ in range(2)]
    try:
        assert [w["sessions"] for w in workers_of(two_workers.url, two_workers.tokens["ops"])] == [
            1,
            1,
        ]  # it takes sessions again
        for session in opened:
            assert ada.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 300, 301]}).status_code == 200
            assert ada.post(f"/v1/sessions/{session}/verify", json={"draft": [5, 6]}).status_code == 200
    finally:
        for session in opened:
            ada.delete(f"/v1/sessions/{session}")


def test_a_worker_killed_mid_generation_costs_no_token(two_workers, draft, target_alone):
    """Server-only decoding streams from the hub's own loop; the hub holds the context, so it moves
    the stream to the live worker itself and the tokens are those of an undisturbed stream."""
    prompt = draft.vocab.tokenize(PROMPTS[2], add_bos=True)
    stop = draft.vocab.stop_token_ids()
    with HubClient(two_workers.url, token=two_workers.tokens["bob"]) as client:
        info = client.info()
        opened = client.open_session(
            wire.OpenSessionRequest(
                vocab_size=info.vocab_size,
                vocab_fingerprint=info.vocab_fingerprint,
                sampling=wire.Sampling(temperature=0.9, seed=7),
                stop_token_ids=stop,
            )
        )
        request = wire.GenerateRequest(mode="autoregressive", tokens=prompt, max_tokens=MAX_TOKENS)
        tokens: list[int] = []
        killed: list[dict] = []
        try:
            for chunk in client.generate(opened.session_id, request):
                tokens += chunk.tokens
                if len(tokens) == 3:
                    holder = next(w for w in workers_of(two_workers.url, two_workers.tokens["ops"]) if w["sessions"])
                    os.kill(holder["pid"], signal.SIGKILL)
                    killed.append(holder)
            placed = {w["worker_id"]: w["sessions"] for w in workers_of(two_workers.url, two_workers.tokens["ops"])}
        finally:
            client.close_session(opened.session_id)
    assert killed and placed[killed[0]["worker_id"]] == 0  # it finished on the other worker
    assert tokens == target_alone.decode(prompt, MAX_TOKENS, frozenset(stop), temperature=0.9, seed=7)


def test_both_workers_killed_mid_reply_leave_the_hub_up_degraded_and_the_reply_completes(
    two_workers, draft, target_alone
):
    """Losing every worker at once once aborted the front end inside Ray (a compiled graph's
    teardown); now the hub says it is degraded, refuses new sessions 503 meanwhile (the client
    waits that out) and serves again once Ray has restarted a worker."""
    ops = two_workers.tokens["ops"]
    rounds = {"n": 0}
    seen: dict = {}

    # An earlier test killed a worker: Ray restarts it, and the hub lists its new pid once its probe
    # sees it back; kill only live processes.
    def both_up() -> bool:
        return all(w["state"] == "ready" and pid_alive(w["pid"]) for w in workers_of(two_workers.url, ops))

    wait_for(both_up, START_S, "both workers up and listed with their live pids")

    def kill_both(tokens: list[int]) -> None:
        rounds["n"] += 1
        if rounds["n"] == 2:
            seen["pids"] = [w["pid"] for w in workers_of(two_workers.url, ops)]
            for pid in seen["pids"]:
                os.kill(pid, signal.SIGKILL)

            def degraded() -> bool:
                answer = httpx.get(f"{two_workers.url}/health")
                seen["health"] = (answer.status_code, answer.json())
                return answer.status_code == 503

            wait_for(degraded, 30, "the hub saying it has no live worker")

    with HubClient(two_workers.url, token=two_workers.tokens["bob"]) as client:
        chat = conversation(draft, client, 0.9, reconnect_s=START_S)
        try:
            reply = chat.ask(PROMPTS[3], on_tokens=kill_both)
            assert chat.reconnects >= 1
        finally:
            chat.close()
    assert two_workers.process.poll() is None  # the front end lived through it
    status, body = seen["health"]
    assert (status, body["status"], body["workers"]) == (503, "degraded", {"ready": 0, "total": 2})
    assert reply.token_ids == expected(target_alone, draft, reply, 0.9)
    wait_for(lambda: both_ready(two_workers.url), START_S, "both workers back")  # /health says 200 with one
    assert not set(seen["pids"]) & {w["pid"] for w in workers_of(two_workers.url, ops)}


@pytest.fixture(scope="module")
def two_nodes(tiny, tmp_path_factory) -> Iterator[tuple[object, object, RunningHub]]:
    """A Ray cluster of two nodes on this machine (one CPU each) and a hub that joins it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        hub = RunningHub(
            tiny.hf_dir,
            tmp_path_factory.mktemp("cluster-hub"),
            *("--workers", "2", "--device", "cpu", "--max-draft-tokens", "16", "--ray-address", cluster.address),
            ready_timeout_s=START_S,
        )
        try:
            yield cluster, second, hub
        finally:
            hub.stop()
    finally:
        cluster.shutdown()


def test_workers_sit_on_both_nodes_and_a_lost_node_rehomes_its_sessions(two_nodes, draft, target_alone):
    cluster, second, hub = two_nodes
    workers = workers_of(hub.url)
    on_second = [w for w in workers if w["node"].endswith(second.node_id[:12])]
    assert len({w["node"] for w in workers}) == 2 and len(on_second) == 1
    on_first = next(w for w in workers if w is not on_second[0])
    # The chat's session must land on the second node: the first node's worker takes none meanwhile.
    assert httpx.post(f"{hub.url}/v1/workers/{on_first['worker_id']}/drain").status_code == 200
    with HubClient(hub.url) as client:
        rounds = {"n": 0}

        def lose_the_node(tokens: list[int]) -> None:
            rounds["n"] += 1
            if rounds["n"] == 2:
                assert workers_of(hub.url)[int(on_second[0]["worker_id"])]["sessions"] == 1
                assert httpx.post(f"{hub.url}/v1/workers/{on_first['worker_id']}/undrain").status_code == 200
                cluster.remove_node(second, allow_graceful=False)
                # Its worker process may outlive its raylet a moment, serving still; wait until it is gone.
                lost = on_second[0]["worker_id"]
                wait_for(lambda: workers_of(hub.url)[int(lost)]["state"] == "lost", 60, "the lost node noticed")

        chat = conversation(draft, client, 0.0)
        try:
            reply = chat.ask(PROMPTS[1], on_tokens=lose_the_node)
            assert rounds["n"] >= 2 and chat.reconnects >= 1
        finally:
            chat.close()
    assert reply.token_ids == expected(target_alone, draft, reply, 0.0)
    states = {w["worker_id"]: w["state"] for w in workers_of(hub.url)}
    assert states[on_second[0]["worker_id"]] == "lost"  # no node has room to restart it
