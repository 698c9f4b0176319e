"""The CPU pool-attention kernel (`pool_kernel.c`): built at start with the machine's C compiler.

`PoolPass.attend` hands a CPU layer to it instead of ATen's SDPA when the hub was started with
`--cpu-attention auto` (the default: for passes whose widest slot view is at most `AUTO_WIDEST`
columns) or `kernel` (every pass). On the project's CPU machine one layer of 8 sessions x 9
tokens over 59 columns took ~46 us in the kernel against ~140 us for the operator's SDPA and
index writes, and the two were even at 2,009 columns (one thread; `benchmarks/pool_kernel.py`).
SDPA spreads a long pass over all threads where the kernel keeps to one, so `auto` leaves wide
passes to SDPA.

The library is built once per source, compiler and CPU into `<cache-dir>/pool-kernel/` (under a
second with gcc); a machine with no C compiler keeps SDPA (`auto`) or refuses to start (`kernel`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pool_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
AUTO_WIDEST = 512  # `auto`: the widest slot view (columns) a pass hands to the kernel
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class PoolKernel:
    """The loaded library: `attend` runs one layer (see pool_kernel.c for the layouts)."""

    def __init__(self, library: Path, widest: int) -> None:
        self.library = ctypes.CDLL(str(library))
        self.widest = widest  # passes with a wider slot view go to SDPA
        self._attend = self.library.pool_attend
        arguments: list[Any] = [_PTR, _I64, _I64, _I64] * 3 + [_PTR, _PTR] + [_I64] * 4 + [_PTR] * 3
        arguments += [_I64] * 4 + [_PTR, _PTR, _I64, ctypes.c_float, _PTR, _PTR]
        self._attend.argtypes = arguments
        self._attend.restype = None
        self._scratch_floats = self.library.pool_scratch
        self._scratch_floats.argtypes, self._scratch_floats.restype = [_I64] * 3, _I64
        self._scratch = torch.empty(0)

    def serves(self, query: torch.Tensor, width: int) -> bool:
        """Whether this layer's shapes are the kernel's: float32 on the CPU, heads of 8k dims."""
        return (
            width <= self.widest
            and query.device.type == "cpu"
            and query.dtype == torch.float32
            and query.shape[-1] % 8 == 0
        )

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pool_keys: torch.Tensor,
        pool_values: torch.Tensor,
        writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        rows: int,
        row_slots: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write the new keys and values into the pool and attend; returns [B', S, Hq, D].

        writes: each real token's (place in the flattened rows, slot, column), int64;
        row_slots: [rows] each row's slot; bias: [rows, S, width] additive mask, contiguous."""
        padded_rows, query_heads, span, dim = query.shape
        heads, capacity, width = key.shape[1], pool_keys.shape[2], bias.shape[-1]
        if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        needed = self._scratch_floats(dim, query_heads // heads * span, width)
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed)
        out = query.new_empty(padded_rows, span, query_heads, dim)
        sources, slots, columns = writes
        self._attend(
            query.data_ptr(), *query.stride()[:3],
            key.data_ptr(), *key.stride()[:3],
            value.data_ptr(), *value.stride()[:3],
            pool_keys.data_ptr(), pool_values.data_ptr(), heads, capacity, dim,
            sources.numel(), sources.data_ptr(), slots.data_ptr(), columns.data_ptr(),
            rows, padded_rows, span, query_heads, row_slots.data_ptr(), bias.data_ptr(), width, scale,
            out.data_ptr(), self._scratch.data_ptr(),
        )  # fmt: skip
        return out


def load_pool_kernel(mode: str, device: torch.device | str, dtype: torch.dtype, cache_dir: Path) -> PoolKernel | None:
    """The kernel for `--cpu-attention mode` on this target, or None where SDPA attends.

    mode: auto (the kernel where it builds, for passes up to AUTO_WIDEST columns), kernel
    (every pass; an error if it cannot be built), sdpa (never)."""
    if mode == "sdpa" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    try:
        library = build(cache_dir / "pool-kernel")
    except RuntimeError as error:
        if mode == "kernel":
            raise RuntimeError(f"--cpu-attention kernel: {error}; start with --cpu-attention sdpa") from error
        log.warning("CPU attention: SDPA (the pool kernel was not built: %s)", error)
        return None
    widest = AUTO_WIDEST if mode == "auto" else 1 << 62
    log.info("CPU attention: the pool kernel (%s) for passes up to %s columns", library.name, widest)
    return PoolKernel(library, widest)


def build(folder: Path) -> Path:
    """The kernel's shared library for this source, compiler and CPU, built once into `folder`."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode() + _cpu().encode()).hexdigest()[:16]
    library = folder / f"pool_kernel-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # built aside, then moved in whole
        built = Path(scratch) / library.name
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(built, library)
    return library


def _cpu() -> str:
    """What -march=native builds for: the CPU's model and feature flags (a cache shared between
    machines must not hand one CPU's library to another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({line for line in lines if line.startswith(wanted)}))
