"""torch.compile's passes saved whole: one function per bucket, which a restart loads instead of compiling.

torch.compile keeps the kernels it generates in its cache, but every start still traces the
decoder (dynamo) and lowers each bucket's graph again: with FlexAttention on the 2-core CPU
machine here, a restart with a warm cache took 299 s for 4 buckets, against 374 s cold. Dynamo's
ahead-of-time compile (`torch.compile(...).aot_compile`, what vLLM's compile cache is built on)
gives a function that serialises whole: the traced bytecode and the compiled graph (AOTAutograd's
bundled entry: inductor's kernels and their wrapper). A later start reads it back and traces
nothing: the GPU's passes (through the attention operator or FlexAttention, CUDA graphs replayed)
and FlexAttention's on any device. A CPU's passes through the operator are AOTInductor packages
instead (`pass_packages.py`).

The runner calls each bucket's function for that bucket only, over the bucket's own buffers
(FlexAttention) or tensors of the bucket's shape (the operator), so the functions keep no
dynamo guards: they would only repeat what the runner already knows (and guards on the model's
modules cost ~0.8 ms a call on the CPU machine; the ones on transformers' classes defined in
local scopes cannot be saved at all).

A function is only loaded under the key it was compiled for, written at the head of its file and
naming everything its code depends on (`SavedPasses.key`): the versions of Python, torch and
transformers, the device, the engine's code, the compile options, the model's configuration
and the shapes of its tensors, and what the caller adds (the KV pool's shape, which flex's
graphs read whole). The weights are read at each call, not baked in, so their values are not part
of the key: a fine-tune of the same model loads the same passes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENGINE = Path(__file__).parent  # its code shapes every graph: any change compiles afresh
SAVED_SUFFIX = ".pass"
KEPT_KEYS = 4  # keys whose compiled passes a cache keeps: those used most recently
# What reading back a damaged or foreign file raises (pickle's errors, a missing class or module,
# inductor refusing its entry): the cure is to compile the pass again.
UNREADABLE = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, RuntimeError)
# What saving one raises where a part of it does not serialise (dynamo's PackageError is a RuntimeError).
UNSAVABLE = (pickle.PicklingError, AttributeError, TypeError, RuntimeError)


class SavedPasses:
    """The compiled passes of one step function, under one key: `folder`/ROWSxWIDTH.pass."""

    def __init__(self, root: Path, step: Callable, options: dict, facts: Sequence[str]):
        self.options = options  # inductor's: also in force while a saved pass is read back
        self.key = _digest([*facts, repr(sorted(options.items()))])
        self.folder = root / self.key
        self._compiler = torch.compile(
            step, fullgraph=True, dynamic=False, options={**options, "guard_filter_fn": _no_guards}
        )

    def load_or_compile(self, rows: int, width: int, example: tuple) -> tuple[Callable, bool]:
        """The bucket's pass, and whether it came from the cache (else compiled now, from the
        step called on `example`, and saved)."""
        path = self.folder / f"{rows}x{width}{SAVED_SUFFIX}"
        if path.exists():
            loaded = self.load(path)
            if loaded is not None:
                return loaded, True
        compiled = self._compiler.aot_compile((example, {}))  # type: ignore[attr-defined]  # set by torch.compile
        self._save(compiled, path)
        compiled.disable_guard_check()
        return compiled, False

    def _save(self, compiled, path: Path) -> None:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        try:
            data = AOTCompiledFunction.serialize(compiled).serialized_data
        except UNSAVABLE as exc:  # the pass runs all the same; only a restart pays for it
            log.warning("compiled pass %s cannot be saved (%s): a restart compiles it again", path.name, exc)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written beside its final name, then renamed: a start stopped mid-write (or two engines
        # compiling the same bucket) never leaves a partial pass under the final name.
        handle, partial = tempfile.mkstemp(prefix=".partial-", suffix=SAVED_SUFFIX, dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(self.key.encode() + b"\n" + data)
            os.replace(partial, path)
        finally:
            Path(partial).unlink(missing_ok=True)

    def load(self, path: Path) -> Callable | None:
        """The saved pass, or None (logged) where it carries another key or does not read back."""
        from torch._dynamo.aot_compile import AOTCompiledFunction

        key, _, data = path.read_bytes().partition(b"\n")
        if key.decode(errors="replace") != self.key:
            log.warning("compiled pass %s was compiled under another key: compiling it again", path)
            return None
        try:
            with torch._inductor.config.patch(self.options):
                compiled = AOTCompiledFunction.deserialize(data)
        except UNREADABLE as exc:
            log.warning("compiled pass %s does not load (%s): compiling it again", path.name, exc)
            return None
        compiled.disable_guard_check()
        return compiled


def prune_other_keys(folder: Path, keep: int = KEPT_KEYS) -> list[Path]:
    """Mark `folder` (one key's compiled passes) used now, and delete all but the `keep` most
    recently used keys beside it: every upgrade of the engine, and every model, makes another
    (a few MB to hundreds a key). Returns what was deleted. A hub already running keeps the
    passes it loaded."""
    if not folder.is_dir():  # nothing of this key was saved
        return []
    os.utime(folder)
    keys = sorted((p for p in folder.parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in keys[keep:]:
        log.info("removing the compiled passes of %s (keeping the %d keys used most recently)", old.name, keep)
        shutil.rmtree(old, ignore_errors=True)
    return keys[keep:]


def model_facts(model: torch.nn.Module) -> list[str]:
    """What a compiled pass of `model` depends on beyond its code: its configuration, and the
    names, types and shapes of its tensors (their values are read at each call)."""
    config = getattr(model, "config", None)
    facts = [config.to_json_string() if config is not None else type(model).__qualname__]
    tensors = [*model.named_parameters(), *model.named_buffers()]
    facts += [f"{name} {tensor.dtype} {tuple(tensor.shape)} {tensor.device.type}" for name, tensor in tensors]
    return facts


def code_facts(device: torch.device | str) -> list[str]:
    """The versions, the device and the engine's code a compiled pass depends on."""
    return [*platform_facts(device), *(source.read_text() for source in sorted(ENGINE.rglob("*.py")))]


def platform_facts(device: torch.device | str) -> list[str]:
    """The versions of Python, torch and transformers, and the device, that compiled code depends on."""
    import transformers

    facts = [sys.version, torch.__version__, transformers.__version__, platform.machine()]
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        facts += [str(torch.version.cuda), properties.name, f"{properties.major}.{properties.minor}"]
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        facts += [cpu_model(), str(pick_vec_isa())]
    return facts


def cpu_model() -> str:
    """The CPU's model name: the kernels' instructions (and MKL's packed weights) are chosen for it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _no_guards(guards: list) -> list[bool]:
    """Dynamo's guards a saved pass keeps: none (the runner picks the bucket; see the module doc)."""
    return [False] * len(guards)


def _digest(facts: Sequence[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for fact in facts:
        digest.update(fact.encode() + b"\0")
    return digest.hexdigest()
