"""The llama.cpp sequence ids draft trees use, in two pools.

Sequence 0 holds the conversation. The draft being verified takes its sequences from one pool,
the proactive draft below its likeliest outcome from the other, so one can be dropped while the
other is kept. Dropping a tree removes its sequences' cells (those shared with sequence 0 stay).
"""

from __future__ import annotations

from typing import Protocol


class SequenceMemory(Protocol):
    def remove(self, sequence: int, start: int = -1, end: int = -1) -> None: ...


class SequencePools:
    """Two pools (slots 0 and 1) of `size` sequence ids each: slot 0 holds 1..size, slot 1 the next."""

    def __init__(self, memory: SequenceMemory, size: int):
        self._memory = memory
        self.size = size
        self._free = {slot: self._all(slot) for slot in (0, 1)}

    @property
    def sequences(self) -> int:
        """Sequences a context needs for both pools and the conversation."""
        return 1 + 2 * self.size

    def take(self, slot: int) -> int | None:
        """A free sequence of `slot`, the lowest first; None when the slot has none left."""
        return self._free[slot].pop() if self._free[slot] else None

    def release(self, slot: int) -> None:
        """Drop every sequence `slot` handed out, and take them all back."""
        for sequence in set(self._all(slot)) - set(self._free[slot]):
            self._memory.remove(sequence)
        self._free[slot] = self._all(slot)

    def _all(self, slot: int) -> list[int]:
        first = 1 + slot * self.size
        return list(range(first + self.size - 1, first - 1, -1))  # pop() hands out the lowest first
