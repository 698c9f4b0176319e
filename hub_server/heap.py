"""The start-up heap, out of the garbage collector's way. Plain Python, no torch.

Python's collector scans every object it tracks at each collection of its oldest generation. A
process that has loaded torch, transformers and a model tracks hundreds of thousands of them (the
engine process here: ~415,000), almost all alive for the process's life, so a full collection
stalls every session for the whole scan (~240 ms here, one every ~40 s at saturation). Once a
process has started, its heap is frozen (`gc.freeze`: moved to a generation no collection
scans), as vLLM does in its engine and API server: collections then scan only what was made
since. What was garbage at start-up is collected first, so nothing dead is kept.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("hub_server")


def freeze_startup_heap(process: str) -> int:
    """Collect, then freeze what is left: the objects of `process`'s start-up. Returns how many."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: %d objects of its start-up frozen (collections skip them)", process, frozen)
    return frozen
