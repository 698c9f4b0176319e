"""Attention backends over the paged pool, one layer at a time, against the reference.

Random passes through shuffled block tables (no row's blocks consecutive or in order), random
draft trees, padded rows and tokens, full and sliding layers: each backend writes the same keys
and values into the pool as the reference, and gives the same outputs for every real token. The
CPU kernel's build and its refusals, and how `--attention auto` decides on a CPU, are here too;
whole decodings through each backend are in test_runner.py and test_compiled_passes.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.attention.choice import choose_attention
from hub_server.engine.attention.flex import FlexBackend
from hub_server.engine.attention.metadata import FULL, SLIDING, PassMetadata, ancestor_closure
from hub_server.engine.attention.reference import ReferenceBackend
from hub_server.engine.kv_pool import BLOCK_TOKENS, blocks_for
from tests.conftest import HAS_COMPILER

needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


def random_pass(generator, rows, padded_rows, span, query_heads, heads, dim, past=70):
    """One layer's pass: the pool (one layer's keys and values), the pass's metadata, and the
    layer's new queries, keys and values as the projections write them. Rows hold up to `past`
    tokens before the pass (at least `past` - 70)."""
    sizes = [span - b % 3 for b in range(rows)]  # some rows padded
    lengths = [past - 70 + int(torch.randint(0, 70, (), generator=generator)) for _ in range(rows)]
    per_row = [blocks_for(length + size) for length, size in zip(lengths, sizes)]
    order = torch.randperm(sum(per_row), generator=generator) + 1  # block 0: the null block
    pool = [torch.randn(1 + sum(per_row) + 3, BLOCK_TOKENS, heads, dim, generator=generator) for _ in range(2)]
    pool[0][0], pool[1][0] = 0.0, 0.0  # the null block holds zeros
    tables = torch.zeros(rows, max(per_row), dtype=torch.long)
    for b, taken in enumerate(order.split(per_row)):
        tables[b, : len(taken)] = taken
    parents = torch.full((padded_rows, span), -1)
    for b in range(rows):
        parents[b, : sizes[b]] = torch.tensor(
            [-1] + [int(torch.randint(-1, i, (), generator=generator)) for i in range(sizes[b] - 1)]
        )
    ancestors = ancestor_closure(parents)
    lengths_t, sizes_t = torch.tensor(lengths), torch.tensor(sizes)
    positions = torch.zeros(padded_rows, span, dtype=torch.long)
    positions[:rows] = lengths_t[:, None] + ancestors[:rows].sum(-1) - 1
    sources = torch.tensor([b * span + s for b in range(rows) for s in range(sizes[b])])
    stored = torch.tensor([lengths[b] + s for b in range(rows) for s in range(sizes[b])])
    row_of = sources // span
    meta = PassMetadata(
        rows=rows,
        tables=tables,
        lengths=lengths_t,
        sizes=sizes_t,
        positions=positions,
        ancestors=ancestors[:rows],
        sources=sources,
        targets=tables[row_of, stored // BLOCK_TOKENS] * BLOCK_TOKENS + stored % BLOCK_TOKENS,
        host_lengths=lengths,
        host_sizes=sizes,
    )

    def new(count: int) -> torch.Tensor:  # [B', S, H, D] seen as [B', H, S, D]
        return torch.randn(padded_rows, span, count, dim, generator=generator).transpose(1, 2)

    return pool, meta, (new(query_heads), new(heads), new(heads))


def through(make_backend, pool, meta, inputs, kind, window, scale):
    """One layer of `kind` through the backend `make_backend(keys, values, kinds, windows)` makes,
    on a copy of the pool: (outputs, the pool after)."""
    keys, values = pool[0].clone(), pool[1].clone()
    backend = make_backend([keys], [values], [kind], {kind: window})
    return backend.begin(meta).attend(*inputs, 0, scale), (keys, values)


def flex_bucket_attend(keys, values, kinds, windows):
    """FlexAttention over the pool in place, as a compiled pass runs it (here uncompiled: flex's
    own reference implementation, every score of the pool computed and masked)."""
    backend = FlexBackend(keys, values, kinds, windows, table_blocks=8)

    class Bucketed:
        def begin(self, meta):
            rows, width = meta.positions.shape
            tokens = torch.zeros(rows, width, dtype=torch.long)
            bucket = backend.bucket(rows, width)
            bucket.fill(meta, tokens, meta.positions)
            return bucket

    return Bucketed()


def kernel_backend(cache):
    from hub_server.engine.cpu.kernel import KernelBackend, build_kernel

    kernel = build_kernel("kernel", cache)
    assert kernel is not None
    return lambda keys, values, kinds, windows: KernelBackend(keys, values, kinds, windows, kernel)


BACKENDS = {
    "flex-views": lambda cache: lambda *pool: FlexBackend(*pool, table_blocks=8),  # eager passes: over gathered views
    "flex-pool": lambda cache: flex_bucket_attend,  # compiled passes' way: flex over the pool in place
    "kernel": kernel_backend,
}


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rows, padded_rows, span, query_heads, heads, dim, window",
    [
        (3, 4, 9, 4, 2, 16, 0),
        (1, 1, 1, 2, 2, 8, 0),
        (5, 8, 6, 8, 1, 24, 20),
        (2, 2, 17, 2, 1, 64, 0),
        (4, 4, 5, 6, 3, 40, 7),
    ],
)
def test_a_backend_attends_and_writes_as_the_reference_does(
    backend, kernel_cache, rows, padded_rows, span, query_heads, heads, dim, window
):
    """Views through shuffled block tables (sliding windows starting mid-block too): each backend's
    outputs for the real tokens and its pool writes equal the reference's."""
    if backend == "kernel" and not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    generator = torch.Generator().manual_seed(rows * 100 + dim)
    pool, meta, inputs = random_pass(generator, rows, padded_rows, span, query_heads, heads, dim)
    kind = SLIDING if window else FULL
    scale = dim**-0.5
    with torch.inference_mode():
        expected, expected_pool = through(ReferenceBackend, pool, meta, inputs, kind, window, scale)
        got, got_pool = through(BACKENDS[backend](kernel_cache), pool, meta, inputs, kind, window, scale)
    assert got.shape == expected.shape == (padded_rows, span, query_heads, dim)
    for b in range(rows):  # a padding token's output is dropped by the runner: only real ones count
        torch.testing.assert_close(
            got[b, : meta.host_sizes[b]], expected[b, : meta.host_sizes[b]], rtol=1e-5, atol=1e-5
        )
    assert torch.equal(expected[rows:], torch.zeros_like(expected[rows:]))
    assert torch.equal(got[rows:], torch.zeros_like(got[rows:]))  # padding rows see nothing
    for ours, theirs in zip(got_pool, expected_pool):
        assert torch.equal(ours, theirs)


@needs_compiler
@needs_compiler
def test_the_kernel_sweeps_views_wider_than_a_cache_span_as_the_reference_attends(kernel_cache):
    """Gemma's heads (256 dims, four queries to a key/value head) over views of ~900 columns: the
    kernel's scores and weighted values go in sweeps of 256 columns, and still equal the reference."""
    generator = torch.Generator().manual_seed(256)
    pool, meta, inputs = random_pass(generator, 3, 3, 9, 4, 1, 256, past=900)
    assert min(meta.host_lengths) > 3 * 256
    with torch.inference_mode():
        expected, _ = through(ReferenceBackend, pool, meta, inputs, FULL, 0, 256**-0.5)
        got, _ = through(kernel_backend(kernel_cache), pool, meta, inputs, FULL, 0, 256**-0.5)
    for b in range(3):
        torch.testing.assert_close(
            got[b, : meta.host_sizes[b]], expected[b, : meta.host_sizes[b]], rtol=1e-5, atol=1e-5
        )


def test_the_library_is_built_once_and_kept(tmp_path):
    from hub_server.engine.cpu.kernel import build

    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no build leftovers


def tiny_pool(dtype=torch.float32, device="cpu"):
    """A pool of a few blocks, as `choose_attention` reads it."""
    from hub_server.engine.kv_pool import KVPlan, KVPool, KVShape

    shape = KVShape(heads=2, dim=16, element_size=dtype.itemsize, layers=1)
    return KVPool(
        shape, KVPlan(blocks=9, max_sessions=2, max_context=64, budget_bytes=0, budget_source=""), dtype, device
    )


def choose(choice, cache, pool=None):
    return choose_attention(choice, pool or tiny_pool(), [FULL], {FULL: 0}, cache, (8, 9, 4, 2, 16), 5)


@needs_compiler
def test_without_a_compiler_auto_keeps_the_reference_and_kernel_says_what_to_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING):
        assert choose("auto", tmp_path).name == "reference"
    assert "no-such-compiler" in caplog.text
    with pytest.raises(RuntimeError, match="--attention reference"):
        choose("kernel", tmp_path)
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="failed to build"):
        choose("kernel", tmp_path)


@needs_compiler
def test_16_bit_targets_go_without_the_kernel_and_say_so(tmp_path):
    assert choose("auto", tmp_path, tiny_pool(torch.bfloat16)).name == "reference"
    with pytest.raises(ValueError, match="float32 targets on a CPU"):
        choose("kernel", tmp_path, tiny_pool(torch.bfloat16))
    assert choose("reference", tmp_path).name == "reference"
    assert choose("flex", tmp_path).name == "flex"
    every = choose("kernel", tmp_path)
    query = torch.zeros(1, 2, 3, 16)
    assert every.name == "kernel" and every.kernel.serves(query, 10**6)
    assert not every.kernel.serves(query[..., :12], 10)  # heads of 12 dims: not multiples of 8
    assert not every.kernel.serves(query.double(), 10)


@needs_compiler
def test_auto_times_both_and_keeps_the_kernel_up_to_the_widest_view_it_won(tmp_path, monkeypatch, caplog):
    from hub_server.engine.cpu import timings
    from hub_server.engine.cpu.kernel import PoolKernel, build

    with caplog.at_level(logging.INFO, logger="hub_server"):
        auto = choose("auto", tmp_path)
    assert "attention:" in caplog.text and "auto" in caplog.text
    if (
        auto.name == "kernel"
    ):  # on this shape the kernel won at 64 columns on every CPU tried; a slower one keeps the reference
        assert auto.kernel.widest in timings.TIMED_WIDTHS

    def timed(kernel, shape, width):  # the decision on set timings: the kernel wins below 256 columns
        return (1.0 if width < 256 else 10.0) if kernel is not None else 2.0

    monkeypatch.setattr(timings, "timed_layer", timed)
    widest, measured = timings.kernel_widest(PoolKernel(build(tmp_path), 0), (8, 9, 4, 2, 16))
    assert [width for width, _, _ in measured] == [64, 128, 256]  # stopped at the first width it lost
    assert widest == 128
    monkeypatch.setattr(timings, "timed_layer", lambda kernel, shape, width: 2.0 if kernel else 1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hub_server"):
        assert choose("auto", tmp_path).name == "reference"
    assert "not faster" in caplog.text


@needs_compiler
def test_auto_keeps_the_kernel_to_passes_on_the_threads_it_was_timed_on(tmp_path, monkeypatch):
    """The kernel keeps to one thread: timed on the verify passes' threads, it serves passes on
    those; a pass on more (a prompt's chunk on every core) goes to the reference, which uses them."""
    from hub_server.engine.cpu import timings

    monkeypatch.setattr(timings, "timed_layer", lambda kernel, shape, width: 1.0 if kernel else 2.0)
    query = torch.zeros(1, 2, 3, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        auto = choose("auto", tmp_path)
        assert auto.name == "kernel" and auto.kernel.serves(query, 64)
        torch.set_num_threads(2)
        assert not auto.kernel.serves(query, 64)
        assert choose("kernel", tmp_path).kernel.serves(query, 64)  # named by hand: every pass
    finally:
        torch.set_num_threads(threads)


@needs_compiler
def test_a_cpu_runner_times_its_attention_on_its_verify_passes_threads(tiny, monkeypatch):
    from hub_server.engine.cpu import timings
    from hub_server.engine.runner import ModelRunner

    seen = []
    monkeypatch.setattr(
        timings,
        "timed_layer",
        lambda kernel, shape, width: seen.append(torch.get_num_threads()) or (2.0 - bool(kernel)),
    )
    runner = ModelRunner(HubSettings(model=str(tiny.hf_dir), attention="auto", threads=0))
    assert runner.verify_threads == 1 and set(seen) == {1}
    assert runner.attention.kernel.threads == 1


def test_an_unknown_choice_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, reference, kernel, flex"):
        HubSettings(model="tiny", attention="fast")
