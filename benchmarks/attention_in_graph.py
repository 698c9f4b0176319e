"""The pool attention inside the compiled graph against the runner's operator path, one process.

    .venv/bin/python benchmarks/attention_in_graph.py [--columns 59 2009] [--passes 400]

16 layers of the dispatch-bound target's attention shape (8 sessions x 9 tokens, 4 query heads
sharing 2 kv heads of 16): each layer writes its new keys and values into the pool and attends
over each session's slot. "in graph": the whole thing compiled by inductor, the pool read by
slot inside its fused kernel (no copy of the past); "operator": the body of the runner's
pool-attention operator as it runs (`index_copy_` writes, SDPA over views of the pool).
Passes alternate; the medians and their ratio are printed. Why the hub keeps the operator: on the
CPU machine (2026-12-02) 16 layers in the graph cost 2.99 against 3.61 ms at 59 columns (1.21x) but
89.2 against 26.7 ms at 2,009 (0.30x): inductor's reduction loops lose to SDPA once the past is long.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from turns import medians_in_turns

SESSIONS, QUERY_HEADS, KV_HEADS, TOKENS, DIM, LAYERS, CAPACITY = 8, 4, 2, 9, 16, 16, 2081
GROUPS = QUERY_HEADS // KV_HEADS


class Pool:
    keys: ClassVar[list[torch.Tensor]] = []
    values: ClassVar[list[torch.Tensor]] = []


def write(layer: int, key: torch.Tensor, value: torch.Tensor, targets: torch.Tensor) -> None:
    Pool.keys[layer].view(-1, DIM).index_copy_(0, targets, key.transpose(1, 2).reshape(-1, DIM))
    Pool.values[layer].view(-1, DIM).index_copy_(0, targets, value.transpose(1, 2).reshape(-1, DIM))


def in_graph(queries, keys, values, slots, targets, mask):
    out = []
    for layer in range(LAYERS):
        write(layer, keys[layer], values[layer], targets)
        width = mask.shape[-1]
        past_keys = Pool.keys[layer][slots][:, :, :width]  # read by slot inside the kernel
        past_values = Pool.values[layer][slots][:, :, :width]
        grouped = queries[layer].reshape(SESSIONS, KV_HEADS, GROUPS * TOKENS, DIM)
        scores = (grouped[:, :, :, :, None] * past_keys.transpose(-1, -2)[:, :, None]).sum(-2)
        weights = (scores * DIM**-0.5 + mask).softmax(-1)
        attended = (weights[..., None] * past_values[:, :, None]).sum(-2)
        out.append(attended.reshape(SESSIONS, QUERY_HEADS, TOKENS, DIM).transpose(1, 2).contiguous())
    return out


def operator(queries, keys, values, slots, targets, mask):
    out = []
    for layer in range(LAYERS):
        write(layer, keys[layer], values[layer], targets)
        width = mask.shape[-1]
        grouped = queries[layer].reshape(SESSIONS, KV_HEADS, GROUPS * TOKENS, DIM)
        attended = F.scaled_dot_product_attention(
            grouped,
            Pool.keys[layer][:SESSIONS, :, :width],
            Pool.values[layer][:SESSIONS, :, :width],
            attn_mask=mask,
            scale=DIM**-0.5,
        )
        out.append(attended.reshape(SESSIONS, QUERY_HEADS, TOKENS, DIM).transpose(1, 2).contiguous())
    return out


def inputs(columns: int, generator: torch.Generator):
    Pool.keys = [torch.randn(SESSIONS, KV_HEADS, CAPACITY, DIM, generator=generator) for _ in range(LAYERS)]
    Pool.values = [torch.randn(SESSIONS, KV_HEADS, CAPACITY, DIM, generator=generator) for _ in range(LAYERS)]
    slots = torch.arange(SESSIONS)
    token_columns = columns - TOKENS + torch.arange(TOKENS).repeat(SESSIONS)
    heads = torch.arange(KV_HEADS)
    targets = ((slots.repeat_interleave(TOKENS)[:, None] * KV_HEADS + heads) * CAPACITY + token_columns[:, None]).view(
        -1
    )
    sees = torch.rand(SESSIONS, 1, GROUPS * TOKENS, columns, generator=generator) > 0.3
    sees[..., 0] = True
    mask = torch.zeros(sees.shape).masked_fill_(~sees, float("-inf"))

    def new(heads: int) -> list[torch.Tensor]:
        return [torch.randn(SESSIONS, TOKENS, heads, DIM, generator=generator).transpose(1, 2) for _ in range(LAYERS)]

    return new(QUERY_HEADS), new(KV_HEADS), new(KV_HEADS), slots, targets, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--columns", type=int, nargs="+", default=[59, 2009])
    parser.add_argument("--passes", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    compiled = torch.compile(in_graph, dynamic=False, fullgraph=True)
    with torch.inference_mode():
        for columns in args.columns:
            batch = inputs(columns, torch.Generator().manual_seed(0))
            torch._dynamo.mark_dynamic(batch[-1], 3)  # the columns a pass covers change every pass
            worst = max((a - b).abs().max().item() for a, b in zip(compiled(*batch), operator(*batch)))
            medians = medians_in_turns(
                {"in graph": partial(compiled, *batch), "operator": partial(operator, *batch)}, args.passes
            )
            graph, op = medians["in graph"] * 1e3, medians["operator"] * 1e3
            print(
                f"{columns} columns: in graph {graph:.3f} ms, operator {op:.3f} ms a pass of {LAYERS} layers, "
                f"operator / in graph {op / graph:.2f}x (outputs differ by at most {worst:.1e})"
            )


if __name__ == "__main__":
    main()
