"""KV memory for every session, allocated once when the hub starts.

Each layer has one keys tensor and one values tensor [slots, H, capacity, D]; a session owns one
slot (the same row of every layer) from the moment it opens until it closes or is evicted.
Full-attention layers hold `max_context` positions. Sliding-window layers hold only the last
window - 1, all that a later query can see, as a ring: position p lives in column p % capacity.
Every layer has `spare` columns more, where a pass writes its new tokens before it knows which
it keeps (`pool_attention.py`). Nothing grows or moves as a session advances, and a pass reads
every slot where it lives. The sizes are planned before allocating (`plan_kv`), so a hub that cannot
hold its configured sessions refuses to start instead of running out of memory later.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from hub_server.errors import KVBudgetError

GIB = 1 << 30
CONTEXT_STEP = 256  # an automatic context length is a multiple of this
MIN_AUTO_CONTEXT = 512  # below this an automatic plan is refused rather than served


@dataclass
class KVSlot:
    """One session's row of the pool. Invariant: it holds every context token but the last
    (`length` of them; sliding-window layers only the last capacity of those)."""

    index: int
    length: int = 0


@dataclass(frozen=True)
class KVShape:
    """What one token costs in every layer: kv heads, head size, element size, each layer's window
    (0: full), and the spare columns every layer has beyond what it keeps: a pass writes its new
    tokens' keys there before it knows which it will keep (the widest row a pass may carry)."""

    heads: int
    dim: int
    element_size: int
    windows: tuple[int, ...]
    spare: int = 0

    def capacities(self, max_context: int) -> list[int]:
        """Columns each layer has per session."""
        full = max_context + self.spare
        return [min(window - 1 + self.spare, full) if window else full for window in self.windows]

    def slot_bytes(self, max_context: int) -> int:
        return 2 * self.heads * self.dim * self.element_size * sum(self.capacities(max_context))


@dataclass(frozen=True)
class KVPlan:
    slots: int
    max_context: int
    budget_bytes: int
    budget_source: str  # how the budget was chosen, for the start-up log line

    def describe(self, shape: KVShape) -> str:
        reserved = self.slots * shape.slot_bytes(self.max_context)
        return (
            f"KV memory: {self.slots} sessions x {self.max_context} tokens = {reserved / GIB:.2f} GiB reserved "
            f"(budget {self.budget_bytes / GIB:.2f} GiB, {self.budget_source})"
        )


def plan_kv(
    shape: KVShape, slots: int, max_context: int, model_limit: int, budget_bytes: int, budget_source: str
) -> KVPlan:
    """Sessions x context that fit `budget_bytes`. An explicit `max_context` (0: none) must fit
    as asked; without one, the longest context up to the model's limit that fits is chosen."""
    if max_context:
        context = min(max_context, model_limit)
        needed = slots * shape.slot_bytes(context)
        if needed > budget_bytes:
            raise KVBudgetError(
                f"{slots} sessions x {context} tokens need {needed / GIB:.2f} GiB of KV memory, more than the "
                f"budget of {budget_bytes / GIB:.2f} GiB ({budget_source}); lower --max-sessions or "
                f"--max-context, or raise --kv-memory-gib"
            )
        return KVPlan(slots, context, budget_bytes, budget_source)
    context = _longest_fitting_context(shape, slots, model_limit, budget_bytes)
    if context < min(MIN_AUTO_CONTEXT, model_limit):
        raise KVBudgetError(
            f"the KV memory budget of {budget_bytes / GIB:.2f} GiB ({budget_source}) holds only {context} tokens "
            f"for each of {slots} sessions; lower --max-sessions, or set --kv-memory-gib (and --max-context)"
        )
    return KVPlan(slots, context, budget_bytes, budget_source)


def _longest_fitting_context(shape: KVShape, slots: int, model_limit: int, budget_bytes: int) -> int:
    if slots * shape.slot_bytes(model_limit) <= budget_bytes:
        return model_limit
    low, high = 0, model_limit // CONTEXT_STEP  # slot_bytes grows with the context: bisect
    while low < high:
        middle = (low + high + 1) // 2
        if slots * shape.slot_bytes(middle * CONTEXT_STEP) <= budget_bytes:
            low = middle
        else:
            high = middle - 1
    return low * CONTEXT_STEP


def column_positions(lengths: torch.Tensor, capacity: int, width: int) -> torch.Tensor:
    """The context position each of a slot's first `width` columns holds, -1 where it holds none.

    lengths: [B] tokens stored per slot. Returns [B, width]. Position p lives in column
    p % capacity; a column holds the latest position written to it.
    """
    columns = torch.arange(width, device=lengths.device)  # [W]
    last = lengths[:, None] - 1  # [B, 1]
    positions = last - torch.remainder(last - columns, capacity)  # [B, W]
    held = columns < torch.clamp(lengths, max=capacity)[:, None]
    return torch.where(held, positions, -1)


class KVPool:
    def __init__(self, shape: KVShape, plan: KVPlan, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        self.max_context = plan.max_context
        self.capacities = shape.capacities(plan.max_context)
        self.slot_bytes = shape.slot_bytes(plan.max_context)
        # torch.empty: on a CPU the pages are only committed as slots are first used.
        self.keys = [
            torch.empty(plan.slots, shape.heads, capacity, shape.dim, dtype=dtype, device=device)
            for capacity in self.capacities
        ]
        self.values = [torch.empty_like(keys) for keys in self.keys]
        self._free = list(range(plan.slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def reserved_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return (self.slots - len(self._free)) * self.slot_bytes

    def take(self) -> KVSlot | None:
        """A free slot, emptied, or None when every slot is in use."""
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
        # Masked columns still enter attention as 0 x value: stale memory must not hold NaN.
        for keys, values in zip(self.keys, self.values):
            keys[index].zero_()
            values[index].zero_()
        return KVSlot(index)

    def give_back(self, slot: KVSlot) -> None:
        with self._lock:
            self._free.append(slot.index)

    def write(
        self, layer: int, slots: torch.Tensor, columns: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store token k's keys and values in column columns[k] of slot slots[k].

        slots, columns: [K]; keys, values: [K, H, D]
        """
        self.keys[layer][slots, :, columns] = keys
        self.values[layer][slots, :, columns] = values
