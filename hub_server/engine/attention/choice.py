"""Which attention backend a hub runs (`--attention auto|reference|kernel|flex`), said in its log.

`auto`, by device:
- **CPU, float32**: by timing. The CPU kernel is built and timed at start against the reference on
  one layer of the hub's own verify shape (`cpu/timings.py`) on the verify passes' torch threads,
  and attends the views up to the widest it won by 10% in passes on those threads; the reference
  attends wider ones (none won: the reference everywhere), and passes on other threads.
  FlexAttention is not a candidate here: on this CPU a compiled layer lost to SDPA over views at
  every context measured (docs/architecture.md).
- **CPU, 16-bit**: the reference (the kernel reads float32).
- **CUDA**: the reference, by rule, until `benchmarks/gpu_check.sh` has shown FlexAttention's
  compiled passes equal and faster on a GPU; `--attention flex` takes them now.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hub_server.engine.attention.flex import FlexBackend
from hub_server.engine.attention.interface import AttentionBackend
from hub_server.engine.attention.reference import ReferenceBackend
from hub_server.engine.kv_pool import KVPool

log = logging.getLogger("hub_server")


def choose_attention(
    choice: str,
    pool: KVPool,
    kinds: list[str],
    windows: dict[str, int],
    cache_dir: Path,
    pass_shape: tuple[int, int, int, int, int],
    table_blocks: int,
) -> AttentionBackend:
    """The backend for `--attention choice` over `pool`: each layer's kind, each kind's window.
    table_blocks: the most blocks a row's table holds (flex's block masks are that wide).
    pass_shape: the verify pass `auto` times on a CPU (rows, tokens a row, query heads, kv heads, head dims)."""
    keys, values = pool.keys, pool.values
    device, dtype = keys[0].device, keys[0].dtype
    if choice == "flex":
        log.info("attention: FlexAttention (--attention flex)")
        return FlexBackend(keys, values, kinds, windows, table_blocks)
    on_cpu = device.type == "cpu" and dtype == torch.float32
    if choice == "kernel" and not on_cpu:
        raise ValueError("--attention kernel: the CPU kernel attends float32 targets on a CPU; use auto or reference")
    if choice == "reference" or not on_cpu:
        how = "--attention reference" if choice == "reference" else f"auto: the rule for {device.type}, {dtype}"
        log.info("attention: the reference, SDPA over gathered views (%s)", how)
        return ReferenceBackend(keys, values, kinds, windows)
    return _cpu_kernel(choice, keys, values, kinds, windows, cache_dir, pass_shape)


def _cpu_kernel(choice, keys, values, kinds, windows, cache_dir, pass_shape) -> AttentionBackend:
    """The CPU kernel backend: every view (`kernel`), or the views it was timed faster on (`auto`)."""
    from hub_server.engine.cpu.kernel import KernelBackend, build_kernel  # CPU-only: loaded only here
    from hub_server.engine.cpu.timings import kernel_widest

    kernel = build_kernel(choice, cache_dir)
    if kernel is None:
        return ReferenceBackend(keys, values, kinds, windows)
    if choice == "kernel":
        log.info("attention: the CPU kernel (%s) for every pass (--attention kernel)", Path(kernel.library._name).name)
        return KernelBackend(keys, values, kinds, windows, kernel)
    kernel.widest, timings = kernel_widest(kernel, pass_shape)
    kernel.threads = torch.get_num_threads()  # the verify passes' (the runner set them for the timing)
    measured = ", ".join(f"{width}: {ours * 1e6:.0f} against {ref * 1e6:.0f} us" for width, ours, ref in timings)
    if not kernel.widest:
        log.info(
            "attention: the reference (auto: the CPU kernel was not faster on a layer of this target: %s)", measured
        )
        return ReferenceBackend(keys, values, kinds, windows)
    log.info(
        "attention: the CPU kernel up to %d columns, the reference beyond (auto, timed on a layer by columns: %s)",
        kernel.widest,
        measured,
    )
    return KernelBackend(keys, values, kinds, windows, kernel)
