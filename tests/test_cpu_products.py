"""A CPU target's float32 matrix products through MKL or oneDNN (`--cpu-matmul`)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hub_server.config import HubSettings
from hub_server.engine.cpu.products import (
    SMALLEST_ROUTED,
    choose_cpu_products,
    onednn_available,
    onednn_linear,
    time_products,
)
from tests.conftest import plain_target

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)]


def fresh(tiny) -> torch.nn.Module:
    return plain_target(tiny.hf_dir).model


def test_a_onednn_product_is_the_matrix_product_to_rounding():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 64, generator=generator), torch.randn(300, generator=generator)
    for shape in [(1, 64), (7, 64), (2, 9, 64)]:
        x = torch.randn(*shape, generator=generator)
        torch.testing.assert_close(onednn_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    transposed = torch.randn(64, 5, generator=generator).t()  # not contiguous
    torch.testing.assert_close(onednn_linear(transposed, weight, None), F.linear(transposed, weight))


def test_onednn_routes_every_linear_layer_and_mkl_none(tiny):
    model = fresh(tiny)
    assert choose_cpu_products(model, "mkl", [1, 8]) == "mkl"
    assert all("forward" not in vars(module) for module in linears(model))
    ids = torch.tensor([[1, 5, 9, 13, 20]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        assert choose_cpu_products(model, "onednn", [1, 8]) == "onednn"
        after = model(input_ids=ids).logits
    assert linears(model) and all("forward" in vars(module) for module in linears(model))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_auto_times_both_and_says_which_it_took(tiny, caplog):
    model = fresh(tiny)
    seconds = time_products(model.get_output_embeddings().weight.detach(), [1, 8])
    assert set(seconds) == {"mkl", "onednn"} and all(len(times) == 2 and min(times) > 0 for times in seconds.values())
    with caplog.at_level(logging.INFO, logger="hub_server.engine.cpu.products"):
        chosen = choose_cpu_products(model, "auto", [1, 8])
    assert chosen in ("mkl", "onednn")
    assert f"CPU matrix products: {'oneDNN' if chosen == 'onednn' else 'MKL'}" in caplog.text
    for module in linears(model):  # auto leaves the smallest layers on MKL
        assert ("forward" in vars(module)) == (chosen == "onednn" and module.weight.numel() >= SMALLEST_ROUTED)


def test_a_16_bit_target_keeps_torchs_own_products(tiny):
    model = fresh(tiny).to(torch.bfloat16)
    assert choose_cpu_products(model, "onednn", [1]) == "default"
    assert all("forward" not in vars(module) for module in linears(model))


def test_an_unknown_library_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="--cpu-matmul must be one of auto, mkl, onednn, not 'blas'"):
        HubSettings(model="unused", cpu_matmul="blas")
