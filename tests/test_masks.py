import pytest
import torch

from core.masks import binarize, block_hw


def test_median_rule_turns_on_exactly_half_of_the_positions():
    maps = torch.rand(3, 64)
    mask = binarize(maps, "median")
    assert mask.sum(1).tolist() == [32.0, 32.0, 32.0]
    # and those are the largest values
    for row in range(3):
        assert maps[row][mask[row].bool()].min() > maps[row][~mask[row].bool()].max()


def test_median_rule_is_invariant_to_positive_scaling():
    """Summing over heads or averaging gives the same mask (the paper does not say which)."""
    maps = torch.rand(2, 50)
    assert torch.equal(binarize(maps), binarize(maps * 8.0))


def test_soft_rule_spans_zero_to_one_and_unknown_rule_is_refused():
    soft = binarize(torch.rand(2, 10), "soft")
    assert soft.min() == 0 and soft.max() == 1
    with pytest.raises(ValueError, match="median"):
        binarize(torch.rand(1, 4), "otsu?")


def test_block_resolution_of_odd_and_non_square_latents():
    assert block_hw(12 * 20, (12, 20)) == (12, 20)
    assert block_hw(3 * 4, (9, 13)) == (3, 4)  # stride-2 levels round up: 9x13 -> 5x7 -> 3x4
