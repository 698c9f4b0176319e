"""The token-only acceptance rule on hand-made tensors."""

import numpy as np
import pytest
import torch

from hub_server.engine.sampling import allowed_only, sample_row, target_choices
from hub_server.tree import accept_chain, position_uniform

NO_STOP = frozenset()


def one_hot_logits(tokens: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.full((len(tokens), vocab), -5.0)  # [S, V]
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_greedy_choices_are_argmax():
    assert target_choices(one_hot_logits([3, 1, 4]), 0.0, seed=0, positions=[0, 1, 2]) == [3, 1, 4]


def test_accepts_longest_matching_prefix_then_bonus():
    assert accept_chain([3, 1, 9, 5], [3, 1, 4, 1, 5], NO_STOP) == (2, [3, 1, 4])


def test_all_accepted_adds_bonus_after_last():
    assert accept_chain([3, 1], [3, 1, 4], NO_STOP) == (2, [3, 1, 4])


def test_first_token_rejected_emits_only_target_token():
    assert accept_chain([7, 1], [3, 1, 4], NO_STOP) == (0, [3])


def test_empty_draft_emits_one_target_token():
    assert accept_chain([], [6], NO_STOP) == (0, [6])


def test_accepted_stop_token_ends_emission_without_bonus():
    assert accept_chain([3, 2, 4], [3, 2, 4, 1], frozenset({2})) == (2, [3, 2])


def test_stop_token_as_bonus_is_emitted():
    assert accept_chain([3, 5], [3, 2, 9], frozenset({2})) == (1, [3, 2])


def test_sampling_is_keyed_by_seed_and_position():
    assert position_uniform(7, 12) == position_uniform(7, 12)
    assert position_uniform(7, 12) != position_uniform(7, 13)
    assert position_uniform(7, 12) != position_uniform(8, 12)


def test_sample_row_follows_the_cdf():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert sample_row(logits, 1.0, 0.1) == 0
    assert sample_row(logits, 1.0, 0.3) == 1
    assert sample_row(logits, 1.0, 0.69) == 1
    assert sample_row(logits, 1.0, 0.71) == 2
    assert sample_row(logits, 1.0, 0.9999999) == 2


def test_sampled_choice_does_not_depend_on_round_split():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    whole = target_choices(logits, 0.8, seed=3, positions=[10, 11, 12, 13])
    split = target_choices(logits[:2], 0.8, 3, [10, 11]) + target_choices(logits[2:], 0.8, 3, [12, 13])
    assert whole == split


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-30])
def test_a_tiny_temperature_draws_the_top_token_not_nan(temperature):
    logits = torch.randn(512, generator=torch.Generator().manual_seed(7)) * 5
    top = int(logits.argmax())
    assert top != 511
    for uniform in (0.0, 0.3, 0.999999):
        assert sample_row(logits, temperature, uniform) == top
    # The draft samples by the same rule: its pick agrees with the hub's.
    from specedge_cli.drafting.sampling import DraftSampler

    assert DraftSampler(temperature, 7).pick(logits.numpy(), 12) == top


def test_a_grammars_mask_restricts_the_choice_to_the_tokens_it_allows():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.5], [0.0, 3.0, 1.0, 2.0, 0.5]])  # [2, V=5]
    masks = np.zeros((2, 1), dtype=np.int32)  # llguidance bitmasks: bit t of word 0 is token t
    masks[0, 0] = (1 << 2) | (1 << 4)  # tokens 2 and 4
    masks[1, 0] = 1 << 3  # token 3 alone
    allowed = allowed_only(logits, masks)
    assert target_choices(allowed, 0.0, seed=0, positions=[0, 1]) == [2, 3]  # argmax over the allowed
    # Seeded draws land on allowed tokens only, in proportion to the target's restricted distribution.
    draws = [sample_row(allowed[0], 1.0, position_uniform(5, p)) for p in range(2000)]
    assert set(draws) == {2, 4}
    expected = torch.softmax(torch.tensor([1.0, 0.5]), dim=0)[0].item()
    assert draws.count(2) / len(draws) == pytest.approx(expected, abs=0.04)
