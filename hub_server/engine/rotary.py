"""Rotary embeddings read from a table of every position, for compiled passes.

transformers computes a pass's rotary cosines and sines from its positions once, and every layer
reads them. Compiled for a CPU, inductor does not keep that small computation's result: it
counts neither cos nor sin as costly, so it folds them into each layer's kernel, and every layer
of a compiled pass computed them again (on the dispatch-bound target, 16 layers, 8 sessions x 9
tokens: one fused kernel of 56 us a layer, mostly scalar cos and sin). A table of each position's
cosines and sines, built once at start by the model's own rotary module, makes them a lookup,
which costs each layer no more than reading a kept result.

Only rotary types whose frequencies do not depend on the sequence (not "dynamic" or "longrope",
which change them as a context grows) are tabled; the others keep the model's own module.
"""

from __future__ import annotations

import contextlib

import torch

UNTABLED = ("dynamic", "longrope")  # rotary types whose frequencies move with the context length


class RotaryTable(torch.nn.Module):
    """Stands in for a model's rotary module: the same (cos, sin) for any positions below `positions`."""

    def __init__(self, rotary: torch.nn.Module, positions: int, dtype: torch.dtype, kinds: list[str | None]):
        super().__init__()
        device = next(iter(rotary.buffers())).device
        every = torch.arange(positions, device=device)[None]  # [1, P]
        probe = torch.zeros(1, dtype=dtype, device=device)  # the module reads only its dtype and device
        self.kinds = {kind: k for k, kind in enumerate(kinds)}
        with torch.inference_mode():
            for kind, k in self.kinds.items():
                cos, sin = rotary(probe, every) if kind is None else rotary(probe, every, kind)
                # Buffers, [P, D] each: a compiled graph takes them as its constants, like the weights.
                self.register_buffer(f"cos_{k}", cos[0].clone(), persistent=False)
                self.register_buffer(f"sin_{k}", sin[0].clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        k = self.kinds[layer_type]
        return getattr(self, f"cos_{k}")[position_ids], getattr(self, f"sin_{k}")[position_ids]


def rotary_table(decoder: torch.nn.Module, positions: int, dtype: torch.dtype) -> RotaryTable | None:
    """A table for `decoder.rotary_emb` (one per layer kind where it has several), or None where
    the decoder has no rotary module or its frequencies move with the context."""
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        return None
    types = rotary.rope_type if isinstance(rotary.rope_type, dict) else {None: rotary.rope_type}
    if any(any(name in str(kind) for name in UNTABLED) for kind in types.values()):
        return None
    return RotaryTable(rotary, positions, dtype, list(types))


@contextlib.contextmanager
def tabled(decoder: torch.nn.Module, table: RotaryTable | None):
    """The decoder's rotary module is the table inside the block (its own module again after)."""
    if table is None:
        yield
        return
    own = decoder.rotary_emb
    decoder.rotary_emb = table
    try:
        yield
    finally:
        decoder.rotary_emb = own
