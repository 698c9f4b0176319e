"""Engine workers on Ray: one actor per device, each holding the target, its KV pool and its passes.

The only module of the hub that imports Ray, and the one place Ray's errors are translated:
whatever way a worker is lost (its process killed, a device error, its node gone, no answer to a
probe within `PROBE_TIMEOUT_S`), a call to it raises `errors.WorkerLost`. The front end
(`service.Hub`) sees each worker through `RayEngine`, an `engine_api.Engine` like the in-process
runner, and keeps everything else: HTTP, accounts, limits, the session table, placement and one
batch scheduler per worker (a whole batch crosses to the worker in one plain actor call).

Ray restarts a lost actor (`max_restarts`), which loads the model again into a fresh KV pool
under a new `incarnation`; slots name the incarnation they belong to, so a call that still names
an old one is refused rather than served from another session's memory.

    front end (the hub process: a Ray driver)            worker actors (one per device, any node)
    Hub ── Scheduler ── RayEngine ── verify_batch ──▶    EngineWorker ── ModelRunner (torch)
        └─ probe thread ─────────── identity ───────▶    (own thread: answers during a pass)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hub_server.config import HubSettings
from hub_server.engine_api import Engine, EngineStats, PassTally, VerifyJob
from hub_server.errors import ClusterError, WorkerLost
from hub_server.heap import freeze_startup_heap
from hub_server.placement import WorkerIdentity
from hub_server.vocabulary import Vocabulary

log = logging.getLogger("hub_server")

PROBE_TIMEOUT_S = 3.0  # a worker that does not answer a probe this long is lost (and killed)
# A live worker's death is seen at once (its `watch` call fails); a round trip, which also finds a
# worker that hangs, is made this often, so that an idle worker's process mostly sleeps.
ROUND_TRIP_S = 2.0
STATS_TIMEOUT_S = 3.0
START_TIMEOUT_S = 1800.0  # loading a large target onto a device
POLL_S = 0.25  # a call in flight checks this often whether its worker was lost meanwhile
# The local Ray cluster's GCS, raylet and workers listen here only: it serves this hub alone.
LOOPBACK = "127.0.0.1"
# What an idle local cluster does less often (its processes sleep between): no task events sent to
# the GCS each second (the hub reads none); no memory check 4 times a second (a worker's memory is
# its model and KV pool: nothing grows that Ray could save by killing a task); the raylet's
# bookkeeping, reports and metrics every second or minute instead of every 0.1-1 s (one node: no
# other raylet or autoscaler waits on them).
IDLE_QUIET = {
    "task_events_report_interval_ms": 0,
    "memory_monitor_refresh_ms": 0,
    "raylet_check_gc_period_milliseconds": 1000,
    "raylet_report_resources_period_milliseconds": 1000,
    "kill_idle_workers_interval_ms": 1000,
    "object_manager_timer_freq_ms": 1000,
    "report_worker_backlog_interval_ms": 10000,
    "local_fs_monitor_interval_ms": 10000,
    "io_context_event_loop_lag_collection_interval_ms": 60000,
    "metrics_report_interval_ms": 60000,
}
MAX_RESTARTS = -1  # Ray restarts a lost worker every time (a failing model load is not restarted)
# A rank of a tensor-parallel worker that does not answer its rank 0 this long is hung (rank 0's
# own probe answers within PROBE_TIMEOUT_S, this included).
RANK_TIMEOUT_S = 2.0
PLACE_TIMEOUT_S = 60.0  # a tensor-parallel worker's devices must be free on one node within this


class StaleSlot(Exception):
    """A call named a KV slot of an earlier incarnation of the worker: the session is gone."""


@dataclass
class RemoteKV:
    """A session's slot in a worker's KV pool, as the front end tracks it."""

    index: int
    incarnation: str
    length: int = 0


@dataclass(frozen=True)
class WorkerDescription:
    """What a worker tells the front end once its model has loaded."""

    name: str
    pieces: tuple[str, ...]
    vocab_size: int
    max_context: int
    widest_verify_row: int
    identity: WorkerIdentity
    shards: str = ""  # a tensor-parallel worker's shard layout (its rank 0's), for the start-up log


@dataclass(frozen=True)
class GroupSeat:
    """A rank's place in a tensor-parallel worker: its rank, the group's size, and where it meets."""

    rank: int
    world: int
    rendezvous: str  # the name of the group's `GroupRendezvous` actor (a name: plain arguments restart plainly)


@dataclass
class _Meeting:
    members: dict[int, Any] = field(default_factory=dict)  # rank -> its actor
    store: str = ""  # rank 0's offer: the file the group meets through
    complete: asyncio.Event = field(default_factory=asyncio.Event)


class GroupRendezvous:
    """Where the ranks of one tensor-parallel worker meet whenever the group starts (at first, and
    each time Ray has restarted its ranks): rank 0 offers the file the group forms through, and
    once every rank has come each learns it, the others' actors, and the file of the group before
    (whose ranks are all gone by then: rank 0 deletes it). An async actor, so the ranks' calls
    wait together."""

    def __init__(self, world: int):
        self.world = world
        self._meeting = _Meeting()
        self._earlier = ""  # the last complete meeting's store

    async def join(self, rank: int, member: Any, offer: str | None) -> tuple[str, list[Any], str]:
        if self._meeting.complete.is_set():  # a rank (re)started after the last meeting: a new one
            self._earlier, self._meeting = self._meeting.store, _Meeting()
        meeting, earlier = self._meeting, self._earlier
        meeting.members[rank] = member
        meeting.store = offer or meeting.store
        if len(meeting.members) == self.world:
            meeting.complete.set()
        await meeting.complete.wait()
        return meeting.store, [meeting.members[r] for r in range(self.world)], earlier


# One verify job as it crosses to the worker, as plain values (cheap to pickle): (incarnation, slot,
# pending, draft, parents, temperature, seed, stop ids, the grammar's masks or None (numpy: the
# engine process computed them, where the session's grammar lives), top_logprobs or None); and
# back: (path, emitted, slot length, logprobs or None).
JobWire = tuple[str, int, list[int], list[int], list[int], float, int, tuple[int, ...], Any, int | None]
ResultWire = tuple[list[int], list[int], int, Any]


class EngineWorker:
    """The Ray actor: one device's `ModelRunner` (imported here, so torch loads only in workers)."""

    def __init__(self, settings: HubSettings, cores: tuple[int, ...] = (), seat: GroupSeat | None = None):
        if cores:  # a CPU worker keeps to its own core, so two never share one
            os.sched_setaffinity(0, cores)
        self.incarnation = uuid.uuid4().hex
        self.slots: dict[int, Any] = {}  # index -> the runner's KV slot, for open sessions
        self.members: list[Any] = []  # a tensor-parallel worker's other ranks (rank 0's)
        if seat is None:
            from hub_server.engine.runner import ModelRunner

            self.runner = ModelRunner(settings)
        else:
            self.runner, members = _take_seat(settings, seat)
            self.members = members if seat.rank == 0 else []
        freeze_startup_heap("worker")  # its passes run here: the model's objects, out of the collector's way

    def describe(self) -> WorkerDescription:
        runner = self.runner
        shards = getattr(runner, "shards", None)
        return WorkerDescription(
            runner.name,
            runner.vocab.pieces,
            runner.vocab_size,
            runner.max_context,
            runner.widest_verify_row,
            self._identity(),
            shards.describe() if shards is not None else "",
        )

    @ray.method(concurrency_group="probe")
    def identity(self) -> WorkerIdentity:
        """Answered on a thread of its own, so a probe does not wait for a pass; a tensor-parallel
        worker's rank 0 answers only once its other ranks have."""
        self._check_members()
        return self._identity()

    @ray.method(concurrency_group="probe")
    def alive(self) -> None:
        """Rank 0 of a tensor-parallel worker asks its other ranks this with each probe."""

    def _check_members(self) -> None:
        """A rank that does not answer in time is hung: kill it (Ray restarts it) and leave with it,
        so that the whole group starts again."""
        if not self.members:
            return
        asked = [member.alive.remote() for member in self.members]
        answered, _ = ray.wait(asked, num_returns=len(asked), timeout=RANK_TIMEOUT_S)
        silent = [member for member, ref in zip(self.members, asked) if ref not in answered]
        if silent:
            log.error("%d ranks of this tensor-parallel worker did not answer: the group restarts", len(silent))
            for member in silent:
                with contextlib.suppress(RayError):
                    ray.kill(member, no_restart=False)
            os._exit(1)

    def _identity(self) -> WorkerIdentity:
        context = ray.get_runtime_context()
        node = f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:12]}"
        device = str(self.runner.device)
        group = getattr(self.runner, "group", None)
        devices, pids = (group.devices, group.pids) if group is not None else ((device,), (os.getpid(),))
        return WorkerIdentity(node, os.getpid(), device, self.incarnation, devices, pids)

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Never answers: the front end holds this call, and Ray fails it the moment this process dies."""
        threading.Event().wait()

    @ray.method(concurrency_group="probe")
    def stats(self) -> EngineStats:
        return self.runner.stats()

    def new_kv(self, scope: str | None = None) -> tuple[int, str] | None:
        slot = self.runner.new_kv(scope)
        if slot is None:
            return None
        self.slots[slot.index] = slot
        return slot.index, self.incarnation

    def release(self, incarnation: str, index: int) -> None:
        if incarnation == self.incarnation and index in self.slots:
            self.runner.release(self.slots.pop(index))

    def reserve(self, incarnation: str, index: int, tokens: int) -> bool:
        return self.runner.reserve(self._slot(incarnation, index), tokens)

    def prefill(self, incarnation: str, index: int, context: list[int]) -> int:
        slot = self._slot(incarnation, index)
        with _device_failure_exits():
            self.runner.prefill(slot, context)
        return slot.length

    def feed(self, incarnation: str, index: int, pending: list[int]) -> int:
        slot = self._slot(incarnation, index)
        with _device_failure_exits():
            self.runner.feed(slot, pending)
        return slot.length

    def verify_batch(self, jobs: list[JobWire]) -> tuple[list[ResultWire], float | None, float]:
        """One pass over the jobs; their results, the pass's fitted fixed cost and its device seconds."""
        runnable = [
            VerifyJob(
                self._slot(incarnation, index), pending, draft, parents, temperature, seed, frozenset(stops), masks, top
            )
            for incarnation, index, pending, draft, parents, temperature, seed, stops, masks, top in jobs
        ]
        with _device_failure_exits():
            seconds = self.runner.verify_batch(runnable)
        results = [(job.path, job.emitted, job.kv.length, job.logprobs) for job in runnable]
        return results, self.runner.pass_fixed_s(), seconds

    def _slot(self, incarnation: str, index: int) -> Any:
        if incarnation != self.incarnation or index not in self.slots:
            raise StaleSlot(f"slot {index} of {incarnation[:8]} is not open on this worker ({self.incarnation[:8]})")
        return self.slots[index]


@contextlib.contextmanager
def _device_failure_exits() -> Iterator[None]:
    """A device error leaves the device unusable for this process: exit, so that Ray starts a
    fresh one, instead of failing every later pass."""
    from hub_server.engine.faults import device_failed

    try:
        yield
    except Exception as exc:
        if device_failed(exc):
            log.error("device error, worker exits to be restarted: %s", exc)
            os._exit(1)
        if type(exc).__name__ == "ShardGroupLost":  # engine.tensor_parallel's: a rank of its group is gone
            log.error("%s; this rank exits so that the group restarts together", exc)
            os._exit(1)
        raise


def _take_seat(settings: HubSettings, seat: GroupSeat) -> tuple[Any, list[Any]]:
    """This rank's runner over its shard, once the group has met and formed, and the group's
    other ranks' actors. Every rank exits when another does (watched), so Ray restarts the group
    together; the ranks past 0 run rank 0's passes on a thread of their own."""
    me = ray.get_runtime_context().current_actor
    # The ranks share a node (the placement group packs them on one), so they meet through a file
    # of its own: no port to find free, nothing listening for it.
    offer = (
        str(Path(tempfile.gettempdir()) / f"specedge-tensor-parallel-{uuid.uuid4().hex}") if seat.rank == 0 else None
    )
    rendezvous: Any = ray.get_actor(seat.rendezvous)
    met: tuple[str, list[Any], str] = ray.get(rendezvous.join.remote(seat.rank, me, offer))
    store, members, earlier = met
    if seat.rank == 0 and earlier:  # the group before this one left its file: every rank of it is gone
        Path(earlier).unlink(missing_ok=True)
    if ray.util.get_node_ip_address() == LOOPBACK:  # the hub's own cluster: the group's sockets on loopback too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    from hub_server.engine.tensor_parallel import ShardedRunner, ShardGroup

    group = ShardGroup.join(Path(store), seat.rank, seat.world, settings.device, _device_label(settings.device))
    runner = ShardedRunner(settings, group)
    others = [member for rank, member in enumerate(members) if rank != seat.rank]
    threading.Thread(target=_exit_with_any, args=(others,), name="watch-ranks", daemon=True).start()
    if seat.rank > 0:
        threading.Thread(target=_follow, args=(runner,), name="follow-rank-0", daemon=True).start()
    else:  # the worker is ready once every rank is: rank 0's probes then find the others answering
        ray.get([member.alive.remote() for member in others])
    return runner, others


def _device_label(device: str) -> str:
    """A rank's device as operators know it: the GPU Ray gave it (by its number on the node), or the CPU."""
    if device.startswith("cuda"):
        return f"cuda:{ray.get_gpu_ids()[0]}"
    return "cpu"


def _exit_with_any(members: list[Any]) -> None:
    """Live only as long as every other rank of the group: their `watch` calls fail when they die."""
    ray.wait([member.watch.remote() for member in members], num_returns=1, timeout=None)
    log.error("a rank of this tensor-parallel worker died: this rank exits so that the group restarts together")
    os._exit(1)


def _follow(runner: Any) -> None:
    """Run rank 0's passes until the group ends or breaks, then exit: Ray starts the rank again."""
    try:
        runner.follow()
    except Exception as exc:
        log.error("tensor-parallel rank stops following rank 0: %s", exc)
    os._exit(1)


class RayEngine:
    """The front end's view of one worker actor: an `Engine`, and `placement.Supervised`."""

    def __init__(self, actor: Any, description: WorkerDescription, kept: tuple[Any, ...] = ()):
        self._actor = actor
        self._kept = kept  # what lives as long as the worker: a tensor-parallel worker's other ranks and group
        self.name = description.name
        self.vocab = Vocabulary(description.pieces)
        self.vocab_size = description.vocab_size
        self.max_context = description.max_context
        self.widest_verify_row = description.widest_verify_row
        # The device is in the worker's process; this lock only serves the front end's own drafter.
        self.device_lock = threading.Lock()
        self.identity = description.identity
        self._lost = False  # set by a failed probe: calls in flight give up instead of waiting
        self._watch: Any = None  # a `watch` call held on the incarnation that last answered a probe
        self._next_round_trip = 0.0
        self._pass_fixed_s: float | None = None
        self._last_stats = EngineStats(0, 0, 0.0, PassTally(), 0, {}, None, None)

    def rest(self, seconds: float) -> None:
        """Until the next probe: while a `watch` holds, until a round trip is due (`seconds` at
        least), woken the moment the process dies (Ray fails the watch); else `seconds`. One wait
        in Ray's core, not a look every `seconds`: an idle worker's hub mostly sleeps."""
        watch = self._watch
        if watch is None:
            time.sleep(seconds)
            return
        with contextlib.suppress(RayError):
            ray.wait([watch], timeout=max(seconds, self._next_round_trip - time.monotonic()))

    def probe(self) -> WorkerIdentity:
        """Its identity: without a call while its `watch` holds and the last round trip is recent.
        A `watch` that Ray has failed means the process died: the worker is lost at once, whatever
        its restart (Ray's, maybe seconds later) answers at the next probe."""
        if self._watch is not None and ray.wait([self._watch], timeout=0)[0]:
            self._lost, self._watch = True, None
            raise WorkerLost("the engine worker's process died; Ray restarts it")
        watched = self._watch is not None
        if watched and time.monotonic() < self._next_round_trip:
            return self.identity
        ref = self._actor.identity.remote()
        try:
            identity = _get(ref, PROBE_TIMEOUT_S)
        except WorkerLost as exc:
            _cancel(ref)  # probes must not pile up behind a worker that is restarting
            if not self._lost and isinstance(exc.__cause__, GetTimeoutError):
                # Alive but not answering: restart it, so that what it holds is known (nothing).
                with contextlib.suppress(RayError):
                    ray.kill(self._actor, no_restart=False)
            self._lost, self._watch = True, None
            raise
        if not watched or identity.incarnation != self.identity.incarnation:
            self._watch = self._actor.watch.remote()
        self.identity, self._lost = identity, False
        self._next_round_trip = time.monotonic() + ROUND_TRIP_S
        return self.identity

    def new_kv(self, scope: str | None = None) -> RemoteKV | None:
        opened = self._call(self._actor.new_kv.remote(scope))
        return None if opened is None else RemoteKV(*opened)

    def release(self, kv: RemoteKV) -> None:
        self._call(self._actor.release.remote(kv.incarnation, kv.index))

    def reserve(self, kv: RemoteKV, tokens: int) -> bool:
        return self._call(self._actor.reserve.remote(kv.incarnation, kv.index, tokens))

    def prefill(self, kv: RemoteKV, context: list[int]) -> None:
        kv.length = self._call(self._actor.prefill.remote(kv.incarnation, kv.index, context))

    def feed(self, kv: RemoteKV, pending: list[int]) -> None:
        kv.length = self._call(self._actor.feed.remote(kv.incarnation, kv.index, pending))

    def verify_batch(self, jobs: list[VerifyJob]) -> float:
        wire = [
            (
                job.kv.incarnation,  # type: ignore[attr-defined]
                job.kv.index,
                job.pending,
                job.draft,
                job.parents,
                job.temperature,
                job.seed,
                tuple(job.stop_token_ids),
                job.masks,
                job.top_logprobs,
            )
            for job in jobs
        ]
        # A plain actor call, not a Ray compiled graph: a compiled graph's reader spins on its
        # channel (a core per idle worker), and losing its actor could abort this process.
        results, self._pass_fixed_s, seconds = self._call(self._actor.verify_batch.remote(wire))
        for job, (path, emitted, length, logprobs) in zip(jobs, results):
            job.path, job.emitted, job.kv.length, job.logprobs = path, emitted, length, logprobs
        return float(seconds)

    def pass_fixed_s(self) -> float | None:
        return self._pass_fixed_s

    def stats(self) -> EngineStats:
        """The worker's figures, or the last ones it gave while it is lost."""
        if not self._lost:
            with contextlib.suppress(WorkerLost):
                self._last_stats = _get(self._actor.stats.remote(), STATS_TIMEOUT_S)
        return self._last_stats

    def _call(self, ref: Any) -> Any:
        """The call's result; WorkerLost as soon as the worker is known lost, however it went."""
        while not ray.wait([ref], timeout=POLL_S)[0]:
            if self._lost:
                _cancel(ref)
                raise WorkerLost("the engine worker holding this session was lost; open a new session")
        return _get(ref, None)


def _cancel(ref: Any) -> None:
    """Drop a call not yet run (a worker that already ran or lost it leaves nothing to cancel)."""
    with contextlib.suppress(RayError, ValueError):
        ray.cancel(ref)


def _get(ref: Any, timeout: float | None) -> Any:
    """`ray.get`, with Ray's failures translated: the one boundary where they enter the hub."""
    try:
        return ray.get(ref, timeout=timeout)
    except GetTimeoutError as exc:
        raise WorkerLost(f"the engine worker did not answer within {timeout:g} s; open a new session") from exc
    except RayTaskError as exc:
        if isinstance(exc.cause, StaleSlot):  # the worker restarted since the session opened
            raise WorkerLost(
                f"the engine worker holding this session restarted ({exc.cause}); open a new session"
            ) from exc
        raise exc.cause from exc  # an error of the engine itself, as it would be in process
    except RayError as exc:  # the actor died, is restarting, or its node is gone
        raise WorkerLost(
            f"the engine worker holding this session was lost ({type(exc).__name__}); open a new session"
        ) from exc


# --- starting the workers ----------------------------------------------------------------------


def start_workers(settings: HubSettings) -> list[Engine]:
    """Start one worker per device (per group of `--tensor-parallel` devices of one node) on the
    cluster `connect` joined, and wait for all of them to load the target."""
    devices = _resolve_auto(settings.worker_devices)
    world = settings.tensor_parallel
    anywhere: list[list[tuple[int, ...]]] = [[()] * world for _ in devices]  # a cluster's nodes: Ray's choice
    cores = _cores_for(devices, world) if settings.ray_address is None else anywhere
    started = [
        _start_worker(_worker_settings(settings, device), index, device, worker_cores)
        for index, (device, worker_cores) in enumerate(zip(devices, cores))
    ]
    try:
        descriptions = [_get(actor.describe.remote(), START_TIMEOUT_S) for actor, _ in started]
    except WorkerLost as exc:
        raise RuntimeError(f"an engine worker failed to start: {exc.__cause__ or exc}") from exc
    for index, description in enumerate(descriptions):
        who = description.identity
        if world == 1:
            log.info("worker %d ready: %s, pid %d on node %s", index, who.device, who.pid, who.node)
        else:
            log.info(
                "worker %d ready: %d devices (%s), ranks' pids %s on node %s; %s",
                *(index, world, ", ".join(who.devices), ", ".join(map(str, who.pids)), who.node, description.shards),
            )
    # Engine's slots are the runner's type; a RayEngine's are RemoteKV, which the service only hands back.
    return [
        cast("Engine", RayEngine(actor, description, kept)) for (actor, kept), description in zip(started, descriptions)
    ]


def _start_worker(
    settings: HubSettings, index: int, device: str, cores: list[tuple[int, ...]]
) -> tuple[Any, tuple[Any, ...]]:
    """A worker's actor (a tensor-parallel worker's rank 0), and what must live as long as it:
    its other ranks, their placement group and their rendezvous."""
    world = len(cores)
    if world == 1:
        return _actor_class(device, 1).remote(settings, cores=cores[0]), ()
    group = _placed_group(device, world, index)
    name = f"specedge-tensor-parallel-{index}-{uuid.uuid4().hex[:12]}"
    rendezvous = ray.remote(num_cpus=0, max_restarts=MAX_RESTARTS)(GroupRendezvous).options(name=name).remote(world)
    ranks = [
        _actor_class(device, world)
        .options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank))
        .remote(settings, cores=cores[rank], seat=GroupSeat(rank, world, name))
        for rank in range(world)
    ]
    return ranks[0], (group, rendezvous, *ranks[1:])


def _placed_group(device: str, world: int, index: int) -> PlacementGroup:
    """`world` devices of one node for worker `index` (a placement group packed on one node), or
    ClusterError saying what is missing."""
    kind = "GPU" if device.startswith("cuda") else "CPU"
    largest = max((node["Resources"].get(kind, 0) for node in ray.nodes() if node["Alive"]), default=0)
    if largest < world:
        raise ClusterError(
            f"--tensor-parallel {world} needs {world} {kind}s on one node, and the largest node of the Ray cluster "
            f"has {largest:g}"
        )
    group = placement_group([{kind: 1}] * world, strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=PLACE_TIMEOUT_S)
    except GetTimeoutError as exc:
        remove_placement_group(group)
        raise ClusterError(
            f"worker {index} found no node with {world} {kind}s free in {PLACE_TIMEOUT_S:g} s "
            f"(--tensor-parallel {world}; the cluster has {ray.available_resources().get(kind, 0):g} {kind}s free "
            "in all, across its nodes)"
        ) from exc
    return group


def connect(settings: HubSettings) -> None:
    """Join `--ray-address`, or start a Ray cluster on this machine for the workers. Call it on the
    main thread: a local cluster's processes die with the thread that started them (PDEATHSIG)."""
    if settings.ray_address:
        try:
            ray.init(address=settings.ray_address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"cannot join the Ray cluster at {settings.ray_address} ({exc}); start it with `ray start --head` "
                "(see docs/operators.md, Running a hub on many GPUs)"
            ) from exc
    else:
        _start_local_cluster(settings.rank_devices)
    # Ray builds its serialisers on first use, importing as it goes; done here, before the threads
    # that start and call the workers (importing on two threads at once fails now and then).
    ray.put(None)


def _start_local_cluster(devices: tuple[str, ...]) -> None:
    gpu_ids = [device.partition(":")[2] for device in devices if device.startswith("cuda:")]
    if gpu_ids:  # exactly the devices asked for, and Ray hands each worker one of them
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    # A CPU worker takes one CPU of Ray's; `auto` may turn out to be one (no GPU here).
    cpus = max(len(os.sched_getaffinity(0)), sum(device in ("cpu", "auto") for device in devices))
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, _system_config=IDLE_QUIET)
    if ray.util.get_node_ip_address() != LOOPBACK:  # cli.py sets Ray's variable before importing it
        log.warning("the local Ray cluster listens on %s, not loopback only", ray.util.get_node_ip_address())


def _resolve_auto(devices: tuple[str, ...]) -> tuple[str, ...]:
    """`auto`: a GPU where the cluster has any, else the CPU (decided here: the front end has no torch)."""
    kind = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    return tuple(kind if device == "auto" else device for device in devices)


def _actor_class(device: str, world: int) -> Any:
    """The worker actor (or one rank of a tensor-parallel worker of `world`) with what it needs
    from a node: one GPU, or one CPU core."""
    on_gpu = device.startswith("cuda")
    options: dict[str, Any] = {
        "num_cpus": 0 if on_gpu else 1,
        "num_gpus": 1 if on_gpu else 0,
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": 0,  # a pass is not repeated behind the client's back: the session is lost
        # Probes and stats on a thread of their own; the held `watch` calls (the front end's, and
        # each other rank's of a tensor-parallel worker) on others.
        "concurrency_groups": {"probe": 1, "watch": world},
    }
    return ray.remote(**options)(EngineWorker)


def _worker_settings(settings: HubSettings, device: str) -> HubSettings:
    """The settings a worker loads its engine with: its own device kind (Ray chose which one)."""
    kind = "cuda" if device.startswith("cuda") else device
    return replace(settings, device=kind, devices=(), workers=1, tensor_parallel=1, ray_address=None, draft=None)


def _cores_for(devices: tuple[str, ...], world: int) -> list[list[tuple[int, ...]]]:
    """On this machine, one core of this process's own for each CPU rank of each worker (round robin)."""
    cores = sorted(os.sched_getaffinity(0))
    cpu_index = 0
    chosen: list[list[tuple[int, ...]]] = []
    for device in devices:
        ranks: list[tuple[int, ...]] = []
        for _ in range(world):
            if device == "cpu":
                ranks.append((cores[cpu_index % len(cores)],))
                cpu_index += 1
            else:
                ranks.append(())
        chosen.append(ranks)
    return chosen
