"""Compiled passes on a CPU: one AOTInductor package per bucket, kept under the cache directory.

torch.compile keeps the kernels it generates in its cache, but a start still traces and lowers
every bucket again: with frozen weights (inductor's `freezing`, which packs them for MKL) neither
its FX graph cache ("mkldnn tensors unpickleable") nor its AOTAutograd cache ("Cannot cache a
graph with freezing enabled") takes the graph, and dynamo traces each bucket anew. On the 2-core
machine here that was ~21 s a bucket, 20 buckets, at every start. So each bucket is exported
(`torch.export`) and compiled ahead of time by AOTInductor into a package (`.pt2`: one shared
library holding the kernels, the pass's C++ wrapper and the frozen weights); a later start loads
it (tens of ms) and traces nothing. The C++ wrapper also costs less a call than torch.compile's
Python one: on the dispatch-bound target, one session's 16-token pass took 3.3-4.4 ms against
5.8-8.6 ms, with bit-identical results.

A package is only ever loaded under the key it was compiled for (`PassPackages.key`), which names
everything its code and baked-in constants depend on: the versions of Python, torch and
transformers, the hub's code that shapes the graph, the CPU and the instruction set its kernels
use, the threads they were generated for, the compile options, and every weight and buffer the
graph holds (their bytes hashed): another model, another torch or another machine's cache
compiles afresh. The key is also written into each package and checked as it loads.

The token embedding is looked up outside the package (one eager lookup a pass), so that a large
vocabulary's table is not copied into every bucket's package; the packed projections are (each
bucket packs them for its own row count, as torch.compile's frozen graphs did in memory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from hub_server.engine.attention.interface import THROUGH_OPERATOR
from hub_server.engine.saved_passes import platform_facts

log = logging.getLogger(__name__)

# Sources whose code shapes the compiled graph beyond the model's own (transformers' version
# names that): how the attention reaches the pool, and the rotary table.
GRAPH_SOURCES = ("attention/interface.py", "rotary.py", "pass_packages.py")
KEY_METADATA = "specedge_pass_key"  # where a package carries the key it was compiled under

CompiledPass = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings, positions) -> hidden


class PassDecoder(torch.nn.Module):
    """The decoder from embeddings on: what a package computes. [B, S, hidden] -> [B, S, hidden]."""

    def __init__(self, decoder: torch.nn.Module, embedding: torch.nn.Embedding, placeholder_mask):
        super().__init__()
        self.decoder = decoder
        self.placeholder_mask = placeholder_mask
        self.embedding_dim, self.embedding_dtype = embedding.embedding_dim, embedding.weight.dtype  # its inputs

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.decoder(
            inputs_embeds=embeddings,
            position_ids=positions,
            attention_mask=self.placeholder_mask,
            use_cache=False,
            kv_pool=THROUGH_OPERATOR,  # each layer calls the attention operator
        )
        return out.last_hidden_state


class PassPackages:
    """The packages of one decoder, compiled under one key: `folder`/ROWSxWIDTH.pt2."""

    def __init__(self, root: Path, module: PassDecoder, threads: int, options: dict):
        self.module = module
        self.options = {**options, "cpp.threads": threads, "aot_inductor.metadata": {}}
        self.key = pass_key(module, self.options)
        self.options["aot_inductor.metadata"] = {KEY_METADATA: self.key}
        self.folder = root / self.key

    def load_or_compile(self, rows: int, width: int) -> tuple[CompiledPass, bool]:
        """The bucket's compiled pass, and whether it came from the cache (else it was compiled now)."""
        path = self.folder / f"{rows}x{width}.pt2"
        if path.exists():
            loaded = self.load(path)
            if loaded is not None:
                return loaded, True
        self._compile(rows, width, path)
        loaded = self.load(path)
        if loaded is None:
            raise RuntimeError(f"a pass package compiled just now does not load: {path}")
        return loaded, False

    def _compile(self, rows: int, width: int, path: Path) -> None:
        embeddings = torch.zeros(rows, width, self.module.embedding_dim, dtype=self.module.embedding_dtype)
        positions = torch.arange(width).repeat(rows, 1)
        with torch.no_grad():
            program = torch.export.export(self.module, (embeddings, positions), strict=False)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written beside its final name, then renamed: a start stopped mid-write (or two engines
        # compiling the same bucket) never leaves a partial package under the final name.
        handle, partial = tempfile.mkstemp(prefix=".partial-", suffix=".pt2", dir=self.folder)
        os.close(handle)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=partial, inductor_configs=self.options)
            os.replace(partial, path)
        finally:
            Path(partial).unlink(missing_ok=True)

    def load(self, path: Path) -> CompiledPass | None:
        """The package's pass, or None (logged) where it does not load or carries another key."""
        try:
            package = torch._inductor.aoti_load_package(str(path))
            key = package.get_metadata().get(KEY_METADATA)
        except RuntimeError as exc:
            log.warning("compiled pass %s does not load (%s): compiling it again", path.name, exc)
            return None
        if key != self.key:
            log.warning("compiled pass %s was compiled under another key: compiling it again", path)
            return None
        loader = package.loader

        def run(embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            # The loader itself: the package's Python call parses its input and output specs
            # at every call.
            return loader.boxed_run([embeddings, positions])[0]

        return run


def pass_key(module: torch.nn.Module, options: dict) -> str:
    """A digest of everything a package compiled from `module` with `options` depends on."""
    digest = hashlib.blake2b(digest_size=16)
    facts = platform_facts("cpu")
    facts += [repr(sorted((name, repr(value)) for name, value in options.items() if name != "aot_inductor.metadata"))]
    here = Path(__file__).parent
    facts += [(here / name).read_text() for name in GRAPH_SOURCES]
    for fact in facts:
        digest.update(fact.encode() + b"\0")
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in tensors:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
