"""`hub_server serve --threads`: the engine runs its passes on the threads it was given."""

from __future__ import annotations

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.runner import ModelRunner


def test_the_engine_runs_its_passes_on_the_threads_it_was_given(tiny):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ModelRunner(HubSettings(model=str(tiny.hf_dir), threads=1, kv_memory_gib=0.0005))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_negative_thread_count_is_refused_with_what_to_give():
    with pytest.raises(ValueError, match="--threads must be 0"):
        HubSettings(model="unused", threads=-1)
