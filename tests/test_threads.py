"""`hub_server serve --threads`: the engine runs its passes on the threads it was given."""

from __future__ import annotations

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.tree import chain_parents


def threads_of_each_pass(runner: ModelRunner) -> tuple[int, int]:
    """torch's threads during a prompt's pass, then during a verify pass."""
    kv = runner.new_kv()
    runner.prefill(kv, [1, 300, 301, 302])
    prompt = torch.get_num_threads()
    runner.verify_batch([VerifyJob(kv, [302], [5, 6], chain_parents(2), 0.0, 0, frozenset())])
    return prompt, torch.get_num_threads()


def test_the_engine_runs_its_passes_on_the_threads_it_was_given(tiny):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runner = ModelRunner(HubSettings(model=str(tiny.hf_dir), threads=1, kv_memory_gib=0.0005))
        assert threads_of_each_pass(runner) == (1, 1)
    finally:
        torch.set_num_threads(before)


def test_by_default_a_cpu_verify_pass_takes_one_thread_and_a_prompt_every_core(tiny):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what torch starts with on this machine: one per core
        runner = ModelRunner(HubSettings(model=str(tiny.hf_dir), device="cpu", kv_memory_gib=0.0005))
        assert threads_of_each_pass(runner) == (2, 1)
    finally:
        torch.set_num_threads(before)


def test_a_negative_thread_count_is_refused_with_what_to_give():
    with pytest.raises(ValueError, match="--threads must be 0"):
        HubSettings(model="unused", threads=-1)
