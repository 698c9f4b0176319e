"""The CPU kernel backend: the hub's own attention kernel (`pool_kernel.c`), built at start with
the machine's C compiler, reading each row's blocks where they live.

It attends a layer kind's views up to `widest` columns and hands wider ones to the reference
(SDPA over gathered views): `--attention kernel` sets no limit; `--attention auto` on a CPU
times one layer of the hub's own verify shape through both at start, at widening views
(`timings.TIMED_WIDTHS`), and keeps the kernel up to the widest view where it took at most 90%
of SDPA's time (none: the reference everywhere). On the project's CPU machine (one
thread), one layer of the dispatch-bound target (8 sessions x 9 tokens, heads of 16) over 59
columns took 24 us in the kernel against 85 us through SDPA and its index writes, 1.6x less at
256 columns and 1.3x at 2,009; with Gemma's heads of 256 dims 1.3x less at 64 columns, even at
256 (`benchmarks/pool_kernel.py`). The kernel keeps to one thread, so where torch has several,
SDPA, which spreads over them, wins sooner: `auto` times both on the verify passes' threads (one
on a CPU unless `--threads`), and a pass run on other threads (a prompt's chunk, on every core)
goes to the reference (3,000 tokens fed into the dispatch-bound target on two threads: 0.40 s
through the reference, 0.50 s through the kernel).

The library is built once per source, compiler and CPU into `<cache-dir>/pool-kernel/` (under a
second with gcc); a machine with no C compiler keeps the reference (`auto`) or refuses to start
(`kernel`).
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

from hub_server.engine.attention.metadata import KindView, PassMetadata
from hub_server.engine.attention.reference import ReferenceBackend, ReferencePass

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pool_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
LAYER = struct.Struct("=16qf")  # pool_kernel.c's `struct layer`: 16 pointers and strides, the scale
LAYER_FIELDS = -(-LAYER.size // 8)  # int64s that hold it, with the C struct's padding (17)
PASS_FIELDS = 12  # pool_kernel.c's `struct pass`: int64s and pointers


class PoolKernel:
    """The loaded library: `attend` runs one layer (see pool_kernel.c for the layouts)."""

    def __init__(self, library: Path, widest: int) -> None:
        self.library = ctypes.CDLL(str(library))
        self.widest = widest  # views wider than this go to the reference
        # The torch threads `widest` was timed on (None: not timed, every pass): a pass run on
        # others (a prompt's chunk on every core) goes to the reference, which spreads over them.
        self.threads: int | None = None
        self._attend = self.library.pool_attend
        self._attend.argtypes, self._attend.restype = [_PTR, _PTR], None
        self._layer = (_I64 * LAYER_FIELDS)()  # one layer's `struct layer`, packed anew each call
        self._layer_address = ctypes.addressof(self._layer)
        sizes = self.library.pool_struct_bytes
        sizes.argtypes, sizes.restype = [], _I64
        if sizes() != LAYER_FIELDS * 8 * 1000 + PASS_FIELDS * 8:  # the C structs and what is packed here
            raise RuntimeError(f"{library.name}: its structs are not the ones kernel.py packs")
        self._scratch_floats = self.library.pool_scratch
        self._scratch_floats.argtypes, self._scratch_floats.restype = [_I64] * 3, _I64
        self._scratch = torch.empty(0)

    def serves(self, query: torch.Tensor, width: int) -> bool:
        """Whether this layer's shapes are the kernel's: float32 on the CPU, heads of 8k dims."""
        return (
            width <= self.widest
            and (self.threads is None or torch.get_num_threads() == self.threads)
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


class KernelBackend(ReferenceBackend):
    """The kernel for the layer kinds whose views it serves in a pass, the reference for the rest."""

    name = "kernel"

    def __init__(self, keys, values, kinds, windows, kernel: PoolKernel):
        super().__init__(keys, values, kinds, windows)
        self.kernel = kernel

    def begin(self, meta: PassMetadata) -> KernelPass:
        return KernelPass(self, meta)


class KernelPass(ReferencePass):
    backend: KernelBackend

    def __init__(self, backend: KernelBackend, meta: PassMetadata):
        super().__init__(backend, meta)
        self._packed: dict[str, ctypes.Array[ctypes.c_int64] | None] = {}  # by kind: None where the reference attends

    def attend(self, query, key, value, layer, scale):
        kind = self.backend.kinds[layer]
        if kind not in self._packed:  # the first layer of its kind in this pass: the kernel's or the reference's
            self._packed[kind] = self._prepare(kind, query, key)
        shared = self._packed[kind]
        if shared is None:
            return super().attend(query, key, value, layer, scale)
        # One call writes and attends in place (pool_kernel.c).
        keys, values = self.backend.keys[layer], self.backend.values[layer]
        return self.backend.kernel.attend(query, key, value, keys, values, shared, scale)

    def _prepare(self, kind: str, query: torch.Tensor, key: torch.Tensor):
        """The kernel's arguments for this kind's layers in this pass, or None where the reference attends them."""
        width = self.meta.view_width(self.backend.windows[kind])
        if not self.backend.kernel.serves(query, width):
            return None
        view: KindView = self.view(kind, query.dtype)  # the bias is [B, S, width], contiguous
        writes = (self.meta.sources, self.meta.targets)
        return self.backend.kernel.prepare(query, key, writes, self.meta.rows, view.places, view.bias)


def build_kernel(choice: str, cache_dir: Path) -> PoolKernel | None:
    """The kernel library for `--attention choice` (auto or kernel), every width allowed; None
    (logged) where `auto` cannot build it. `kernel` that cannot be built is an error."""
    try:
        library = build(cache_dir / "pool-kernel")
    except RuntimeError as error:
        if choice == "kernel":
            raise RuntimeError(f"--attention kernel: {error}; start with --attention reference") from error
        log.warning("attention: the reference (the CPU kernel was not built: %s)", error)
        return None
    return PoolKernel(library, 1 << 62)


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
