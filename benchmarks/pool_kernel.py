"""The CPU pool kernel against SDPA over the pool, one layer of the pool attention, one process.

    .venv/bin/python benchmarks/pool_kernel.py [--columns 59 256 512 2009] [--threads 1] [--passes 300]
        [--sessions 8] [--tokens 9] [--query-heads 4] [--kv-heads 2] [--dim 16]

Each pass is one layer's `attend` as the runner calls it (write the new keys and values into their
blocks, attend over each row's view): once through the hub's kernel (`--attention kernel`), once
through the reference, SDPA over gathered views and two index copies (`reference`), in turns. The
defaults are the dispatch-bound target's shape (benchmarks/dispatch_target.py, 8 sessions x 9
tokens); Gemma 3 270M is `--query-heads 4 --kv-heads 1 --dim 256`, Qwen2.5 1.5B
`--query-heads 12 --kv-heads 2 --dim 128`. Prints the median microseconds a layer and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch
from turns import medians_in_turns

from hub_server.engine.attention.metadata import FULL
from hub_server.engine.attention.reference import ReferenceBackend
from hub_server.engine.cpu.kernel import KernelBackend, build_kernel
from hub_server.engine.cpu.timings import sample_inputs, sample_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--columns", type=int, nargs="+", default=[59, 256, 512, 2009])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=9)
    parser.add_argument("--query-heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        kernel = build_kernel("kernel", Path(cache))
    assert kernel is not None
    print(f"{args.sessions} sessions x {args.tokens} tokens, {args.query_heads} query heads on {args.kv_heads} "
          f"kv heads of {args.dim}, {args.threads} thread(s); microseconds a layer, median of {args.passes}")  # fmt: skip
    scale = args.dim**-0.5
    with torch.inference_mode():
        for columns in args.columns:
            shape = (args.sessions, args.tokens, args.query_heads, args.kv_heads, args.dim)
            keys, values, meta = sample_pass(shape, columns)
            inputs = sample_inputs(shape, torch.Generator().manual_seed(columns))
            kinds, windows = [FULL], {FULL: 0}
            through_kernel = KernelBackend(keys, values, kinds, windows, kernel).begin(meta)
            through_sdpa = ReferenceBackend(keys, values, kinds, windows).begin(meta)
            ways = {
                name: partial(attention.attend, *inputs, 0, scale)
                for name, attention in (("kernel", through_kernel), ("sdpa", through_sdpa))
            }
            medians = medians_in_turns(ways, args.passes)
            worst = (through_kernel.attend(*inputs, 0, scale) - through_sdpa.attend(*inputs, 0, scale)).abs().max()
            ours, sdpa = medians["kernel"] * 1e6, medians["sdpa"] * 1e6
            print(
                f"{columns:>6} columns: kernel {ours:8.1f} us, SDPA {sdpa:8.1f} us, SDPA / kernel {sdpa / ours:5.2f}x"
                f" (outputs differ by at most {worst:.1e})"
            )


if __name__ == "__main__":
    main()
