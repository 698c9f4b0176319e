"""The CPU pool-attention kernel (`pool_kernel.c`): built at start with the machine's C compiler.

`PoolPass.attend` hands a CPU layer to it instead of ATen's SDPA when the hub was started with
`--cpu-attention kernel` (every pass), or `auto` (the default) for the passes it measured the
kernel faster on: at start, `auto` times one layer of the hub's own verify shape through both,
at widening slot views (`TIMED_WIDTHS`), and keeps the kernel up to the widest view where it
took at most 90% of SDPA's time (none: SDPA everywhere). On the project's CPU machine (one
thread), one layer of the dispatch-bound target (8 sessions x 9 tokens, heads of 16) over 59
columns took 24 us in the kernel against 85 us through SDPA and its index writes, 1.6x less at
256 columns and 1.3x at 2,009; with Gemma's heads of 256 dims 1.3x less at 64 columns, even at
256 (`benchmarks/pool_kernel.py`). The kernel keeps to one thread, so where torch has several,
SDPA, which spreads over them, wins sooner and `auto` keeps the kernel to fewer columns.

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
import struct
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pool_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
TIMED_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)  # `auto`: the slot views (columns) timed at start
FASTER = 0.9  # `auto`: the kernel's time at most this share of SDPA's
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
LAYER = struct.Struct("=16qf")  # pool_kernel.c's `struct layer`: 16 pointers and strides, the scale
LAYER_FIELDS = -(-LAYER.size // 8)  # int64s that hold it, with the C struct's padding (17)
PASS_FIELDS = 12  # pool_kernel.c's `struct pass`: int64s and pointers


class PoolKernel:
    """The loaded library: `attend` runs one layer (see pool_kernel.c for the layouts)."""

    def __init__(self, library: Path, widest: int) -> None:
        self.library = ctypes.CDLL(str(library))
        self.widest = widest  # passes with a wider slot view go to SDPA
        self._attend = self.library.pool_attend
        self._attend.argtypes, self._attend.restype = [_PTR, _PTR], None
        self._layer = (_I64 * LAYER_FIELDS)()  # one layer's `struct layer`, packed anew each call
        self._layer_address = ctypes.addressof(self._layer)
        sizes = self.library.pool_struct_bytes
        sizes.argtypes, sizes.restype = [], _I64
        if sizes() != LAYER_FIELDS * 8 * 1000 + PASS_FIELDS * 8:  # the C structs and what is packed here
            raise RuntimeError(f"{library.name}: its structs are not the ones pool_kernel.py packs")
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

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        writes: tuple[torch.Tensor, torch.Tensor],
        rows: int,
        places: torch.Tensor,
        bias: torch.Tensor,
    ) -> ctypes.Array[ctypes.c_int64]:
        """What every layer of one kind shares in a pass, packed once a pass as pool_kernel.c's
        `struct pass` (the tensors it points into must live as long: the pass holds them).

        writes: each real token's (place in the flattened rows, row in the pool), int64;
        places: [rows, width] the pool row each column of a row's view reads, contiguous int64;
        bias: [rows, S, width] additive mask, contiguous."""
        padded_rows, query_heads, span, dim = query.shape
        heads, width = key.shape[1], bias.shape[-1]
        needed = self._scratch_floats(dim, query_heads // heads * span, width)
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed)
        sources, targets = writes
        fields = (
            heads, dim, sources.numel(), sources.data_ptr(), targets.data_ptr(), rows, padded_rows, span,
            query_heads, places.data_ptr(), bias.data_ptr(), width,
        )  # fmt: skip
        return (_I64 * PASS_FIELDS)(*fields)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pool_keys: torch.Tensor,
        pool_values: torch.Tensor,
        shared: ctypes.Array[ctypes.c_int64],
        scale: float,
    ) -> torch.Tensor:
        """Write the layer's new keys and values into the pool and attend; returns [B', S, Hq, D].
        shared: `prepare`'s `struct pass` for the pass and the layer's kind."""
        q, k, v = query.stride(), key.stride(), value.stride()
        if q[3] != 1 or k[3] != 1 or v[3] != 1:  # the kernel reads each head's dims in a row
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
            q, k, v = query.stride(), key.stride(), value.stride()
        padded_rows, query_heads, span, dim = query.shape
        out = query.new_empty(padded_rows, span, query_heads, dim)
        LAYER.pack_into(
            self._layer, 0, query.data_ptr(), q[0], q[1], q[2], key.data_ptr(), k[0], k[1], k[2], value.data_ptr(),
            v[0], v[1], v[2], pool_keys.data_ptr(), pool_values.data_ptr(), out.data_ptr(), self._scratch.data_ptr(),
            scale,
        )  # fmt: skip
        self._attend(self._layer_address, ctypes.addressof(shared))
        return out


def load_pool_kernel(
    mode: str,
    device: torch.device | str,
    dtype: torch.dtype,
    cache_dir: Path,
    shape: tuple[int, int, int, int, int] = (8, 9, 4, 2, 16),
) -> PoolKernel | None:
    """The kernel for `--cpu-attention mode` on this target, or None where SDPA attends.

    mode: auto (the kernel where it builds, for the slot views it was timed faster on), kernel
    (every pass; an error if it cannot be built), sdpa (never). shape: the verify pass `auto`
    times, (rows, tokens a row, query heads, kv heads, head dims)."""
    if mode == "sdpa" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    try:
        library = build(cache_dir / "pool-kernel")
    except RuntimeError as error:
        if mode == "kernel":
            raise RuntimeError(f"--cpu-attention kernel: {error}; start with --cpu-attention sdpa") from error
        log.warning("CPU attention: SDPA (the pool kernel was not built: %s)", error)
        return None
    kernel = PoolKernel(library, 1 << 62)
    if mode == "kernel":
        log.info("CPU attention: the pool kernel (%s) for every pass", library.name)
        return kernel
    kernel.widest, timings = widest_faster(kernel, shape)
    measured = ", ".join(f"{width}: {ours * 1e6:.0f} against {sdpa * 1e6:.0f} us" for width, ours, sdpa in timings)
    if not kernel.widest:
        log.info("CPU attention: SDPA (the pool kernel was not faster on a layer of this target: %s)", measured)
        return None
    log.info(
        "CPU attention: the pool kernel up to %d columns, SDPA beyond (a layer, by columns: %s)",
        kernel.widest,
        measured,
    )
    return kernel


def widest_faster(
    kernel: PoolKernel, shape: tuple[int, int, int, int, int]
) -> tuple[int, list[tuple[int, float, float]]]:
    """The widest of `TIMED_WIDTHS` up to which the kernel ran a layer of `shape` in at most
    FASTER of SDPA's time (0 if none), and the timings: (width, kernel s, SDPA s), best of 5."""
    from hub_server.engine.pool_attention import timed_layer  # the pool attention imports this module

    widest, timings = 0, []
    for width in TIMED_WIDTHS:
        ours, sdpa = timed_layer(kernel, shape, width), timed_layer(None, shape, width)
        timings.append((width, ours, sdpa))
        if ours > FASTER * sdpa:
            break
        widest = width
    return widest, timings


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
        try:
            result = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False
            )
        except OSError as error:
            raise RuntimeError(f"the C compiler {compiler} did not run ({error})") from error
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
