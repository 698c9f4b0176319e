"""The target's choices over a pass's logits, and the tree masks the pass attends with.

Sampling is keyed by (seed, absolute position) (`hub_server.tree.position_uniform`), so a seeded
reply through the hub equals the target sampling alone with the same seed, token for token.
"""

from __future__ import annotations

import numpy as np
import torch

from hub_server.tree import position_uniform
from specedge_common.grammar import allowed


def allowed_only(logits: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """The logits with the tokens a grammar does not allow at -inf: then argmax and `sample_row`
    choose among the allowed ones exactly as over the target's distribution restricted to them.

    logits: [R, V]; masks: [R, words] int32 llguidance bitmasks (bits past V are ignored, tokens
    past the bits disallowed: a model's padded vocabulary rows).
    """
    vocab = logits.shape[-1]
    bits = allowed(masks, vocab)  # [R, min(V, 32 * words)]
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    keep[:, : bits.shape[1]] = torch.from_numpy(bits)
    return logits.masked_fill(~keep.to(logits.device), float("-inf"))


def sample_row(logits: torch.Tensor, temperature: float, uniform: float) -> int:
    """Inverse-CDF sample of one token from softmax(logits / temperature).

    The logits are shifted so that their largest is 0 before they are divided: a tiny temperature
    (1e-308, 5e-324) then sends the others to -inf, never the top to +inf (inf - inf is NaN, and a
    NaN softmax drew the last vocabulary id). So any temperature > 0 samples; one so small that
    every other token's probability underflows draws the top token (a tie, by the uniform number).

    logits: [V]
    """
    shifted = logits.double() - logits.double().max()  # [V], float64 for a stable CDF; max 0
    probs = torch.softmax(shifted / temperature, dim=-1)  # [V]
    cdf = torch.cumsum(probs, dim=-1)
    # The first token whose CDF passes the uniform number (right: a token of probability 0 is never drawn).
    point = torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
    token = int(torch.searchsorted(cdf, point, right=True))
    return min(token, logits.shape[-1] - 1)


def target_choices(logits: torch.Tensor, temperature: float, seed: int, positions: list[int]) -> list[int]:
    """The target's token at each row: argmax at temperature 0, else a position-keyed sample.

    logits: [S, V]; row i decides the token at absolute context position positions[i].
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1).tolist()
    return [sample_row(row, temperature, position_uniform(seed, position)) for row, position in zip(logits, positions)]


def ancestor_masks(rows: list[list[int]], width: int) -> torch.Tensor:
    """mask[b, i, j] is True when node j of row b is node i or one of its ancestors: [B, S, S]
    bool for S = width. Rows shorter than S are padded with nodes that see only themselves.

    Each node's ancestors are a bit set (its parent's, plus itself), unpacked in one step.
    """
    row_bytes = (width + 7) // 8
    packed = bytearray()
    for parents in rows:
        ancestors: list[int] = []
        for index, parent in enumerate(parents):
            ancestors.append((ancestors[parent] if parent >= 0 else 0) | (1 << index))
        ancestors += [1 << index for index in range(len(parents), width)]
        for mask in ancestors:
            packed += mask.to_bytes(row_bytes, "little")
    bits = np.unpackbits(
        np.frombuffer(bytes(packed), dtype=np.uint8).reshape(len(rows), width, row_bytes),
        axis=-1,
        count=width,
        bitorder="little",
    )
    return torch.from_numpy(bits.astype(bool))
