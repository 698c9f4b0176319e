"""Which library computes a CPU target's float32 matrix products: MKL (torch's default) or oneDNN.

On a CPU a verify pass is mostly matrix products of few rows (a pass's tokens) by large weights:
the vocabulary projection and every layer's projections. torch sends float32 products to MKL;
on the AMD EPYC machine here oneDNN ran Gemma 3's and Qwen2.5's projections and MLPs 1.5-2.0x
faster at 8 and 72 rows (one thread, `benchmarks/cpu_products.py`); on the Intel Xeon here it
took half MKL's time for 8 rows of Gemma's whole projection and 0.9x for 72. Which is faster
depends on the CPU (MKL is Intel's own), so the runner measures both at start on a slice of the
model's own projection and uses the faster (`--cpu-matmul auto`), for every layer but the
smallest, where a call's fixed cost decides.

oneDNN reads the model's weights as they are: no second copy, no packing at start. Its results
differ from MKL's in the last bits, as MKL's own do between row counts; the replies still equal
the target decoding alone (the hub's equality tests run through oneDNN against transformers on
MKL). Compiled passes keep inductor's own products (MKL, packed once when the weights are
frozen): only eager calls take this path.
"""

from __future__ import annotations

import logging
import time
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Output columns of the projection timed at start: a slice past the caches, as the whole
# projection is (on the Intel machine here the two tied on 8,192 columns of Gemma 3's, 21 MB,
# while on the whole 262k oneDNN took half MKL's time for 8 rows): ~0.3 s for both libraries.
TIMED_COLUMNS = 32768
TIMED_REPEATS = 3
FASTER_BY = 0.9  # oneDNN is chosen when it takes at most this share of MKL's time
# Under this many weights a product is a few microseconds, and oneDNN's ~20 us a call more than
# MKL's loses (here: 0.4x at 512 x 64 by 9 rows, 1.1-1.4x from 256 x 640 up): `auto` leaves them on MKL.
SMALLEST_ROUTED = 1 << 17


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through oneDNN: input [..., K] by weight [N, K] (+ bias [N]) -> [..., N]."""
    return torch.ops.mkldnn._linear_pointwise(input.contiguous(), weight, bias, "none", [], "")


def _onednn_forward(module: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # inductor packs its own products
        return F.linear(input, module.weight, module.bias)
    return onednn_linear(input, module.weight, module.bias)


def time_products(weight: torch.Tensor, rows: list[int]) -> dict[str, list[float]]:
    """Seconds each library takes for a product of each of `rows` rows by `weight` [N, K] (best
    of TIMED_REPEATS, the libraries taking turns), in the order of `rows`."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(count, weight.shape[1], generator=generator, dtype=weight.dtype) for count in rows]
    products = {"mkl": lambda x: F.linear(x, weight), "onednn": lambda x: onednn_linear(x, weight, None)}
    spent: dict[str, list[list[float]]] = {name: [[] for _ in rows] for name in products}
    with torch.inference_mode():
        for _ in range(TIMED_REPEATS + 1):  # the first round warms both up
            for name, product in products.items():
                for times, x in zip(spent[name], inputs):
                    started = time.perf_counter()
                    product(x)
                    times.append(time.perf_counter() - started)
    return {name: [min(times[1:]) for times in counts] for name, counts in spent.items()}


def choose_cpu_products(model, choice: str, rows: list[int]) -> str:
    """Route the float32 CPU `model`'s (a transformers model) linear layers through the library
    `choice` names, or the faster one measured on its projection (`auto`). Returns the library
    in use: mkl, onednn, or default (not a float32 CPU target: torch's own choice)."""
    projection = model.get_output_embeddings().weight
    if projection.device.type != "cpu" or projection.dtype != torch.float32:
        return "default"  # CUDA's own libraries; a 16-bit CPU target goes to oneDNN already
    if choice == "mkl":
        return "mkl"
    if not onednn_available():
        if choice == "onednn":
            raise ValueError("--cpu-matmul onednn: this torch build has no oneDNN; use auto or mkl")
        return "mkl"
    smallest = 0  # --cpu-matmul onednn: every layer
    if choice == "auto":
        seconds = time_products(projection[:TIMED_COLUMNS].detach(), rows)
        # Each row count weighs the same: a pass projects a few rows (its roots) as often as many.
        share = sum(ours / mkl for ours, mkl in zip(seconds["onednn"], seconds["mkl"])) / len(rows)
        faster = share <= FASTER_BY
        timings = ", ".join(
            f"{count} rows: MKL {mkl * 1e3:.1f} ms, oneDNN {ours * 1e3:.1f} ms"
            for count, mkl, ours in zip(rows, seconds["mkl"], seconds["onednn"])
        )
        log.info("CPU matrix products: %s (timed on the projection, %s)", "oneDNN" if faster else "MKL", timings)
        if not faster:
            return "mkl"
        smallest = SMALLEST_ROUTED
    for module in model.modules():
        routed = isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32
        if routed and module.weight.numel() >= smallest:
            module.forward = types.MethodType(_onednn_forward, module)
    return "onednn"
