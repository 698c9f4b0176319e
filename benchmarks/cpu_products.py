"""MKL against oneDNN for the float32 matrix products of a CPU verify pass, side by side.

    .venv/bin/python benchmarks/cpu_products.py [--rows 1 8 72] [--threads 1] [--repeats 5]

For each product shape a hub's targets run (rows are a pass's tokens: 8 sessions x 9 is 72),
prints the median time of MKL (`F.linear`, torch's default for float32) and of oneDNN (what
`--cpu-matmul onednn` uses, `hub_server/engine/cpu/products.py`), the two taking turns, and
their ratio. Random weights of each real model's sizes; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hub_server.engine.cpu.products import onednn_available, onednn_linear

# (what, output features, input features): each model's vocabulary projection and largest layer.
SHAPES = [
    ("Gemma 3 270M projection", 262_144, 640),
    ("Gemma 3 270M MLP up", 2_048, 640),
    ("Qwen2.5 1.5B projection", 151_936, 1_536),
    ("Qwen2.5 1.5B MLP up", 8_960, 1_536),
    ("dispatch-bound target q/k/v", 128, 64),
]


def median_seconds(product, x: torch.Tensor, weight: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(x, weight)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def onednn_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, weight, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 72])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not onednn_available():
        sys.exit("this torch build has no oneDNN")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per product, median of {args.repeats}")
    print(f"{'product':<30} {'rows':>5} {'MKL':>9} {'oneDNN':>9} {'MKL/oneDNN':>11}")
    with torch.inference_mode():
        for what, out_features, in_features in SHAPES:
            weight = torch.randn(out_features, in_features, generator=generator)
            # Tiny products repeat more so a median is not one timer tick.
            repeats = args.repeats if out_features * in_features > 1 << 20 else args.repeats * 100
            for rows in args.rows:
                x = torch.randn(rows, in_features, generator=generator)
                mkl, onednn = [], []
                for _ in range(3):  # turns: a shared machine's slow phase hits both
                    mkl.append(median_seconds(F.linear, x, weight, repeats))
                    onednn.append(median_seconds(onednn_product, x, weight, repeats))
                a, b = min(mkl), min(onednn)
                print(f"{what:<30} {rows:>5} {a * 1e3:>9.3f} {b * 1e3:>9.3f} {a / b:>10.2f}x")


if __name__ == "__main__":
    main()
