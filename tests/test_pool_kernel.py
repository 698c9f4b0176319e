"""The CPU pool-attention kernel (`--cpu-attention`): the same attention as SDPA over the pool,
the same tokens as the target alone, built once, and a clear refusal where it cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.kv_pool import BLOCK_TOKENS, blocks_for
from hub_server.engine.pool_attention import FULL, PoolPass, view_places
from hub_server.engine.pool_kernel import build, load_pool_kernel
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.tree import chain_parents
from tests.conftest import plain_target

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built = load_pool_kernel("kernel", "cpu", torch.float32, tmp_path_factory.mktemp("kernel-cache"))
    assert built is not None
    return built


def random_pass(generator, rows, padded_rows, span, sizes, lengths, query_heads, heads, dim, kernel, window=0):
    """One layer's pass over a pool of blocks handed to the rows shuffled (no row's blocks are
    consecutive, nor in order), with a random tree-like mask; returns the pass and its inputs.
    `window`: the rows' views start that many positions before their first new token."""
    per_row = [blocks_for(length + size) for length, size in zip(lengths, sizes)]
    order = torch.randperm(sum(per_row), generator=generator) + 1  # block 0: the null block
    pool = [torch.randn(1 + sum(per_row), BLOCK_TOKENS, heads, dim, generator=generator) for _ in range(2)]
    tables = torch.zeros(rows, max(per_row), dtype=torch.long)
    for b, taken in enumerate(order.split(per_row)):
        tables[b, : len(taken)] = taken
    starts = torch.tensor([max(0, length - window + 1) if window else 0 for length in lengths])
    ends = torch.tensor(lengths) + torch.tensor(sizes)
    width = int((ends - starts).max())
    sources = torch.tensor([b * span + s for b in range(rows) for s in range(sizes[b])])
    stored = torch.tensor([lengths[b] + s for b in range(rows) for s in range(sizes[b])])
    row_of = sources // span
    sees = torch.rand(rows, span, width, generator=generator) > 0.4
    sees[..., 0] = True
    layout = PoolPass(
        keys=[pool[0]],
        values=[pool[1]],
        kinds=[FULL],
        rows=rows,
        sources=sources,
        targets=tables[row_of, stored // BLOCK_TOKENS] * BLOCK_TOKENS + stored % BLOCK_TOKENS,
        places={FULL: view_places(tables, starts, ends, width)},
        biases={FULL: torch.zeros(sees.shape).masked_fill_(~sees, float("-inf"))},
        kernel=kernel,
    )

    def new(count: int) -> torch.Tensor:  # as the projections write them: [B', S, H, D] seen as [B', H, S, D]
        return torch.randn(padded_rows, span, count, dim, generator=generator).transpose(1, 2)

    return layout, new(query_heads), new(heads), new(heads)


@pytest.mark.parametrize(
    "rows, padded_rows, span, query_heads, heads, dim, window, past",
    [
        (3, 4, 9, 4, 2, 16, 0, 70),
        (1, 1, 1, 2, 2, 8, 0, 70),
        (5, 8, 6, 8, 1, 24, 20, 70),
        (2, 2, 17, 2, 1, 64, 0, 70),
        (4, 4, 5, 6, 3, 40, 7, 70),
        (3, 3, 9, 4, 1, 256, 0, 900),  # Gemma's heads: views of several of the kernel's cache-sized sweeps
    ],
)
def test_the_kernel_attends_and_writes_as_sdpa_over_the_pool_does(
    kernel, rows, padded_rows, span, query_heads, heads, dim, window, past
):
    """Views through shuffled block tables (sliding windows starting mid-block too), some wider
    than the columns the kernel sweeps at a time: the kernel's outputs and pool writes equal
    SDPA's over the gathered views, and it copies no past."""
    generator = torch.Generator().manual_seed(rows * 100 + dim)
    sizes = [span - b % 3 for b in range(rows)]  # some rows padded
    lengths = [past - 70 + int(torch.randint(0, 70, (), generator=generator)) for _ in range(rows)]
    layout, query, key, value = random_pass(
        generator, rows, padded_rows, span, sizes, lengths, query_heads, heads, dim, kernel, window
    )
    pool = {"keys": [layout.keys[0].clone()], "values": [layout.values[0].clone()]}
    fields = {name: value for name, value in vars(layout).items() if not name.startswith("_")}  # no caches
    reference = PoolPass(**{**fields, "kernel": None, **pool})
    scale = dim**-0.5
    got = layout.attend(query, key, value, 0, scale)
    expected = reference.attend(query, key, value, 0, scale)
    assert got.shape == expected.shape == (padded_rows, span, query_heads, dim)
    for b in range(rows):  # a padding token's output is dropped by the runner: only real ones count
        torch.testing.assert_close(got[b, : sizes[b]], expected[b, : sizes[b]], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[rows:], torch.zeros_like(got[rows:]))
    torch.testing.assert_close(layout.keys[0], reference.keys[0], rtol=0, atol=0)
    torch.testing.assert_close(layout.values[0], reference.values[0], rtol=0, atol=0)
    assert layout.copied_bytes == 0


def test_the_library_is_built_once_and_kept(tmp_path):
    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no build leftovers


def test_without_a_compiler_auto_keeps_sdpa_and_kernel_says_what_to_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="hub_server.engine.pool_kernel"):
        assert load_pool_kernel("auto", "cpu", torch.float32, tmp_path) is None
    assert "SDPA" in caplog.text and "no-such-compiler" in caplog.text
    with pytest.raises(RuntimeError, match="--cpu-attention sdpa"):
        load_pool_kernel("kernel", "cpu", torch.float32, tmp_path)
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="failed to build"):
        load_pool_kernel("kernel", "cpu", torch.float32, tmp_path)


def test_sdpa_gpu_and_16_bit_targets_go_without_the_kernel(tmp_path):
    assert load_pool_kernel("sdpa", "cpu", torch.float32, tmp_path) is None
    assert load_pool_kernel("auto", "cuda", torch.float32, tmp_path) is None
    assert load_pool_kernel("auto", "cpu", torch.bfloat16, tmp_path) is None
    every = load_pool_kernel("kernel", "cpu", torch.float32, tmp_path)
    query = torch.zeros(1, 2, 3, 16)
    assert every is not None and every.serves(query, 10**6)
    assert not every.serves(query[..., :12], 10)  # heads of 12 dims: not multiples of 8
    assert not every.serves(query.double(), 10)


def test_auto_times_both_and_keeps_the_kernel_up_to_the_widest_view_it_won(tmp_path, monkeypatch, caplog):
    from hub_server.engine import pool_attention, pool_kernel

    def timed(kernel, shape, width):  # the decision on set timings: the kernel wins below 256 columns
        return (1.0 if width < 256 else 10.0) if kernel is not None else 2.0

    with caplog.at_level(logging.INFO, logger="hub_server.engine.pool_kernel"):
        auto = load_pool_kernel("auto", "cpu", torch.float32, tmp_path, (8, 9, 4, 2, 16))
    assert "CPU attention:" in caplog.text
    if auto is not None:  # on this shape the kernel won at 64 columns on every CPU tried; a slower one keeps SDPA
        assert auto.widest in pool_kernel.TIMED_WIDTHS
    monkeypatch.setattr(pool_attention, "timed_layer", timed)
    widest, timings = pool_kernel.widest_faster(pool_kernel.PoolKernel(build(tmp_path), 0), (8, 9, 4, 2, 16))
    assert [width for width, _, _ in timings] == [64, 128, 256]  # stopped at the first width it lost
    assert widest == 128
    monkeypatch.setattr(pool_attention, "timed_layer", lambda kernel, shape, width: 2.0 if kernel else 1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hub_server.engine.pool_kernel"):
        assert load_pool_kernel("auto", "cpu", torch.float32, tmp_path) is None
    assert "not faster" in caplog.text


def test_an_unknown_choice_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, kernel, sdpa"):
        HubSettings(model="tiny", cpu_attention="fast")


@pytest.mark.parametrize("mode", ["kernel", "sdpa"])
def test_verifies_through_either_attention_decode_like_the_target_alone(tiny, tmp_path, mode):
    """Sessions of several lengths, chains and a tree, batched: the kernel runner (every pass
    through the kernel) and the SDPA runner each give the target's own tokens."""
    runner = ModelRunner(HubSettings(model=str(tiny.hf_dir), cpu_attention=mode, cache_dir=tmp_path))
    assert (runner.pool_kernel is not None) == (mode == "kernel")
    alone = plain_target(tiny.hf_dir)
    contexts = [[1, 40, 41, 42], [1, 7] * 30, [1, *range(300, 340)]]
    drafts = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16]]
    jobs = []
    for context, draft in zip(contexts, drafts):
        kv = runner.new_kv()
        runner.prefill(kv, context)
        jobs.append(VerifyJob(kv, context[kv.length :], draft, chain_parents(len(draft)), 0.0, 0, frozenset()))
    runner.verify_batch(jobs)
    for context, job in zip(contexts, jobs):
        assert job.emitted == alone.decode(context, len(job.emitted))
    # A tree: two branches from the last token, the target's own next token on one of them.
    context = contexts[2] + jobs[2].emitted
    best = alone.decode(context, 2)
    kv = jobs[2].kv
    tree = VerifyJob(kv, context[kv.length :], [best[0] + 1, best[0], best[1]], [-1, -1, 1], 0.0, 0, frozenset())
    runner.verify_batch([tree])
    assert tree.emitted[:2] == best
