"""Tensor parallelism: one engine worker over N devices of one node (`--tensor-parallel N`).

Each rank holds 1/N of every decoder layer: its share of the query heads, of the key/value heads
(and so of the KV pool: each rank's pool holds its heads of every block) and of the MLP's
columns. The split is the hub's own, over the few linear layers of a layer (Megatron-LM's
column/row split, as gpt-fast's `tp.py` does it), not transformers' tensor-parallel plans:

    q, k, v, gate, up   column parallel: the rows of the rank's heads and MLP columns; each rank
                        computes them from the whole hidden state, nothing exchanged
    o, down             row parallel: the matching input columns; the ranks' partial products
                        are summed (one all-reduce after each), then the bias is added once

so the hidden state between layers is whole and the same on every rank; embeddings, norms and
the rotary tables are replicated. The hub's attention over the pool needs nothing of this: it
reads a rank's heads from the shapes of its queries and keys, and each rank's pool is [blocks,
16, kv heads / N, dim]. A target with fewer key/value heads than ranks (Gemma 3 270M has one)
gives each rank a copy of the key/value head its query heads read, as vLLM does.

Rank 0 leads. It alone keeps the sessions' block tables, runs the vocabulary projection and the
acceptance rule, and answers the service; before each pass it sends the pass's layout (each
session's length and block table, the rows' tokens and parents) to the other ranks, which run
the same pass on their shards over blocks of the same numbers; the moves that close a tree's gap
go the same way. The layouts go over a gloo group of their own, whose long timeout lets a rank
wait for its next pass for as long as the hub idles; the all-reduces go over the default group
(gloo on a CPU, NCCL on CUDA). A rank that dies breaks both: the others' next collective fails
(`ShardGroupLost`), and the whole group starts again together (`workers.py`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hub_server.config import HubSettings, default_cache_dir
from hub_server.engine.kv_pool import SessionKV
from hub_server.engine.layout import PassBatch
from hub_server.engine.loading import choose_dtype, load_target
from hub_server.engine.runner import ModelRunner

log = logging.getLogger("hub_server")

# A rank waits for its next pass's layout for as long as the hub idles; inside a pass, a
# collective waits only for the other ranks to reach it (a rank that hangs is found by the
# worker's probes long before this).
IDLE_TIMEOUT = timedelta(days=7)
PASS_TIMEOUT = timedelta(minutes=10)


class ShardGroupLost(RuntimeError):
    """Another rank of this tensor-parallel group is gone (its process, or the connection to it):
    the group's passes cannot go on, and the whole group must start again."""


# --- which share of each layer a rank holds ------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """What rank `rank` of `world` holds of every decoder layer, as [first, end) ranges."""

    rank: int
    world: int
    query_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp_columns: tuple[int, int]
    totals: tuple[int, int, int]  # the target's query heads, key/value heads, MLP columns
    head_dim: int

    @property
    def kv_copied(self) -> bool:
        """Fewer key/value heads than ranks: each rank keeps a copy of the one its queries read."""
        return self.totals[1] < self.world

    def describe(self) -> str:
        heads, kv, mlp = self.totals
        copied = f" (a copy on each of {self.world // kv} ranks)" if self.kv_copied else ""
        return (
            f"tensor-parallel rank {self.rank} of {self.world}: query heads {_span(self.query_heads)} of {heads}, "
            f"key/value heads {_span(self.kv_heads)} of {kv}{copied}, MLP columns {_span(self.mlp_columns)} of {mlp}; "
            "embeddings, norms and the vocabulary projection whole"
        )


def _span(span: tuple[int, int]) -> str:
    first, end = span
    return str(first) if end - first == 1 else f"{first}-{end - 1}"


def plan_shards(config: Any, rank: int, world: int) -> ShardLayout:
    """Rank `rank`'s share of a target with this (transformers) config; ValueError when `world`
    ranks cannot split it evenly."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    mlp = text.intermediate_size
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if heads % world or mlp % world or (kv % world and world % kv):
        raise ValueError(
            f"--tensor-parallel {world} does not split this target evenly: its {heads} query heads and {mlp} MLP "
            f"columns must divide by {world}, and its {kv} key/value heads divide by it or into it"
        )
    per_query, per_column = heads // world, mlp // world
    if kv >= world:
        kv_span = (rank * kv // world, (rank + 1) * kv // world)
    else:  # the query heads of a rank all read one key/value head, which it keeps a copy of
        kv_span = (rank * kv // world, rank * kv // world + 1)
    return ShardLayout(
        rank,
        world,
        (rank * per_query, (rank + 1) * per_query),
        kv_span,
        (rank * per_column, (rank + 1) * per_column),
        (heads, kv, mlp),
        dim,
    )


def shard_model(model: Any, layout: ShardLayout) -> None:
    """Keep only `layout`'s share of each decoder layer of `model` (in place), and make its
    config say so (the KV pool and the start-up timings read the rank's head counts from it)."""
    dim = layout.head_dim
    query, kv = _rows(layout.query_heads, dim), _rows(layout.kv_heads, dim)
    columns = _rows(layout.mlp_columns, 1)
    for index, layer in enumerate(_layers(model)):
        attention, mlp = _attention_and_mlp(layer, index)
        for linear in (attention.q_proj,):
            _keep_rows(linear, query)
        for linear in (attention.k_proj, attention.v_proj):
            _keep_rows(linear, kv)
        attention.o_proj = SummedOverRanks(_keep_columns(attention.o_proj, query))
        attention.num_key_value_groups = (query.stop - query.start) // (kv.stop - kv.start)
        for linear in (mlp.gate_proj, mlp.up_proj):
            _keep_rows(linear, columns)
        mlp.down_proj = SummedOverRanks(_keep_columns(mlp.down_proj, columns))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = columns.stop - columns.start
    text = model.config.get_text_config(decoder=True)
    text.head_dim = dim  # the rank's head counts below would otherwise change what it is read as
    text.num_attention_heads = layout.query_heads[1] - layout.query_heads[0]
    text.num_key_value_heads = layout.kv_heads[1] - layout.kv_heads[0]
    text.intermediate_size = columns.stop - columns.start


def _layers(model: Any) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--tensor-parallel: cannot find the decoder layers of {type(model).__name__}")
    return layers


def _attention_and_mlp(layer: nn.Module, index: int) -> tuple[nn.Module, nn.Module]:
    """A layer's attention and MLP, with the linear layers the split needs (Llama, Qwen 2, Gemma 3 and kin)."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    wanted = {attention: ("q_proj", "k_proj", "v_proj", "o_proj"), mlp: ("gate_proj", "up_proj", "down_proj")}
    for module, names in wanted.items():
        if module is None or not all(isinstance(getattr(module, name, None), nn.Linear) for name in names):
            raise ValueError(
                f"--tensor-parallel: layer {index} ({type(layer).__name__}) lacks the linear layers it splits "
                "(self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)"
            )
    assert attention is not None and mlp is not None
    return attention, mlp


def _rows(span: tuple[int, int], size: int) -> slice:
    return slice(span[0] * size, span[1] * size)


def _keep_rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    """Column parallel: the output features in `rows` (copied, so the whole weight can go)."""
    linear.weight = nn.Parameter(linear.weight.data[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone(), requires_grad=False)
    linear.out_features = rows.stop - rows.start
    return linear


def _keep_columns(linear: nn.Linear, columns: slice) -> nn.Linear:
    """Row parallel: the input features in `columns`."""
    linear.weight = nn.Parameter(linear.weight.data[:, columns].clone(), requires_grad=False)
    linear.in_features = columns.stop - columns.start
    return linear


class SummedOverRanks(nn.Module):
    """A row-parallel linear layer: this rank's partial product, summed over the ranks (one
    all-reduce), then the bias, once."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias = linear.bias
        linear.register_parameter("bias", None)
        self.partial = linear  # called as a module: a CPU's routing of products (`cpu/products.py`) applies

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        summed = self.partial(hidden)
        try:
            dist.all_reduce(summed)
        except RuntimeError as exc:  # gloo's and NCCL's errors: a peer gone, a connection broken
            raise ShardGroupLost(f"an all-reduce of the tensor-parallel group failed: {exc}") from exc
        return summed if self.bias is None else summed + self.bias


def parameter_bytes(module: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


# --- the group, and what rank 0 sends the others ---------------------------------------------------


@dataclass(frozen=True)
class LaidPass:
    """A pass as rank 0 laid it out: what the other ranks need to run the same pass on their shards."""

    sessions: list[tuple[int, list[int]]]  # each row's session: its stored tokens and its block table
    rows: list[list[int]]
    parents: list[list[int]]
    bucketed: bool
    counted: bool = False  # a verify pass (not a context fed apart)


@dataclass(frozen=True)
class MovedPositions:
    """Pool rows copied in every layer (a tree's accepted nodes moved down to close the gap)."""

    sources: list[int]
    targets: list[int]


@dataclass
class ShardGroup:
    """This process's place in a tensor-parallel group, and the group's channel for rank 0's passes."""

    rank: int
    world: int
    commands: Any  # the gloo group the layouts go over
    devices: tuple[str, ...] = field(default=())  # each rank's device, in rank order
    pids: tuple[int, ...] = field(default=())  # each rank's process

    @classmethod
    def join(cls, store: Path, rank: int, world: int, device: str, label: str) -> ShardGroup:
        """Join the group meeting at `store` (a file no group used before, on the node all ranks
        share) as `rank` on `device` (cpu or cuda), named `label` to operators; waits for every rank."""
        backend = "nccl" if device.startswith("cuda") else "gloo"
        try:
            dist.init_process_group(
                backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=PASS_TIMEOUT
            )
            group = cls(rank, world, dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))
            devices, pids = zip(*group.gather((label, os.getpid())), strict=True)
        except RuntimeError as exc:
            raise ShardGroupLost(f"the tensor-parallel group at {store} did not form: {exc}") from exc
        group.devices, group.pids = tuple(devices), tuple(pids)
        return group

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def send(self, message: LaidPass | MovedPositions | None) -> None:
        """Rank 0: the next thing every other rank runs (None: the group ends)."""
        self._broadcast(message)

    def receive(self) -> LaidPass | MovedPositions | None:
        """The other ranks: rank 0's next message, waited for as long as the hub idles."""
        return self._broadcast(None)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.commands)
        return values

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.commands)
        return int(tensor.item())

    def close(self) -> None:
        dist.destroy_process_group()

    def _broadcast(self, message: Any) -> Any:
        box = [message]
        try:
            dist.broadcast_object_list(box, src=0, group=self.commands)
        except RuntimeError as exc:
            raise ShardGroupLost(f"the tensor-parallel group lost a rank: {exc}") from exc
        return box[0]


# --- a runner over one rank's shard --------------------------------------------------------------


class ShardedRunner(ModelRunner):
    """A `ModelRunner` over this rank's shard of the target. Rank 0's is the worker's engine, and
    sends each pass to the others before running it; the others `follow` until the group ends."""

    def __init__(self, settings: HubSettings, group: ShardGroup):
        self.group = group
        self._laid: tuple[PassBatch, LaidPass] | None = None
        self.shards: ShardLayout | None = None
        # Passes run eagerly: a compiled pass would have to hold the all-reduces (not built yet).
        super().__init__(replace(settings, compile="off"))
        if not self.group.leads and torch.device(self.device).type != "cpu":
            # Rank 0 zeroes blocks as it first hands them out (a masked column must not read NaN);
            # the other ranks hand none out, so theirs are zeroed once here.
            for tensor in self.pool.keys + self.pool.values:
                tensor.zero_()

    @property
    def devices(self) -> tuple[str, ...]:
        return self.group.devices

    def _load_model(self, model_path: Path, settings: HubSettings):
        """The target loaded whole on the CPU, cut down to this rank's share, then moved to its device."""
        dtype = choose_dtype(settings.dtype, self.device)
        model = load_target(model_path, "cpu", dtype, settings.cache_dir or default_cache_dir())
        self.shards = plan_shards(model.config, self.group.rank, self.group.world)
        whole, whole_layers = parameter_bytes(model), parameter_bytes(_layers(model))
        shard_model(model, self.shards)
        self.weight_bytes, self.layer_bytes = parameter_bytes(model), parameter_bytes(_layers(model))
        log.info(
            "%s; this rank holds %.1f of the decoder layers' %.1f MB and %.1f of all %.1f MB of weights",
            self.shards.describe(),
            self.layer_bytes / 1e6,
            whole_layers / 1e6,
            self.weight_bytes / 1e6,
            whole / 1e6,
        )
        return model.to(self.device)

    def _kv_budget(self, settings: HubSettings) -> tuple[int, str]:
        """Every rank's pool has the same blocks: as many as the device with the least room holds."""
        budget, source = super()._kv_budget(settings)
        least = self.group.smallest(budget)
        return least, source if least == budget else f"{source}, on the group's device with the least"

    def warm_up(self, max_batch: int, max_draft: int) -> None:
        if self.group.leads:  # the other ranks run its passes as they come
            super().warm_up(max_batch, max_draft)

    def finish(self) -> None:
        """Rank 0: end the group (the other ranks' `follow` returns)."""
        self.group.send(None)

    def follow(self) -> None:
        """Another rank: run rank 0's passes on this shard until it ends the group; ShardGroupLost
        when it is gone."""
        while (message := self.group.receive()) is not None:
            if isinstance(message, MovedPositions):
                self._move_positions(message.sources, message.targets)
                continue
            slots = [SessionKV(-1, length, blocks) for length, blocks in message.sessions]
            threads = self.verify_threads if message.counted else self.prompt_threads
            with self.device_lock:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                batch = self.layout.lay(slots, message.rows, message.parents, message.bucketed)
                self._forward(batch, message.counted)

    # --- rank 0: each pass and move sent to the others before it runs here ------------------------
    def _batch(self, slots, rows, parents, bucketed=False) -> PassBatch:
        batch = super()._batch(slots, rows, parents, bucketed)
        self._laid = (batch, LaidPass([(slot.length, list(slot.blocks)) for slot in slots], rows, parents, bucketed))
        return batch

    def _forward(self, batch: PassBatch, counted: bool = False) -> torch.Tensor:
        if self.group.leads:
            assert self._laid is not None and self._laid[0] is batch, "a pass runs as it was laid out"
            self.group.send(replace(self._laid[1], counted=counted))
        return super()._forward(batch, counted)

    def _move_positions(self, sources: list[int], targets: list[int]) -> None:
        if self.group.leads:
            self.group.send(MovedPositions(sources, targets))
        super()._move_positions(sources, targets)
