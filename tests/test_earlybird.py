"""The Early-Bird rule on recorded mask sequences, and its BN-gamma mask."""
import pytest
import torch
import torch.nn as nn

from loft_ext.plugins.earlybird import EarlyBirdRule, bn_channel_mask, mask_distance


def _mask(bits):
    return torch.tensor([b == "1" for b in bits])


def test_fires_exactly_when_the_newest_mask_is_within_threshold_of_the_four_older():
    # 20 channels: one flipped channel = distance 0.05, three = 0.15
    base = "11110000111100001111"
    one = "01110000111100001111"
    three = "00010000111100001111"
    rule = EarlyBirdRule(keep=5, threshold=0.1)
    sequence = [three, base, base, one, base, base, one, base]
    fired = [rule.put(_mask(m)) for m in sequence]
    # check 5 (index 4) compares base with [three, base, base, one]: 0.15 > 0.1 -> no;
    # check 6 compares base with [base, base, one, base]: all <= 0.1 -> fires; stays true after
    assert fired == [False, False, False, False, False, True, True, True]
    assert rule.dists == pytest.approx([0.05, 0.0, 0.0, 0.05])


def test_needs_five_masks_and_a_distance_at_the_threshold_counts_as_close():
    rule = EarlyBirdRule(keep=5, threshold=0.1)
    ten = "1111111111"
    off_by_one = "0111111111"  # distance exactly 0.1
    assert [rule.put(_mask(m)) for m in [ten, ten, ten, ten]] == [False] * 4
    assert rule.put(_mask(off_by_one)) is True
    assert mask_distance(_mask(ten), _mask(off_by_one)) == pytest.approx(0.1)  # 1 - 9/10, as the reference


def test_bn_mask_keeps_gammas_strictly_above_the_ratio_quantile():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -0.9, 0.5, 0.3]))
        model[3].weight.copy_(torch.tensor([-0.2, 0.8, 0.05, 0.6, 0.7, -0.4]))
    mask = bn_channel_mask(model, 0.5)
    # |gamma| sorted: .05 .1 .2 .3 .4 .5 .6 .7 .8 .9 -> threshold = sorted[5] = 0.5, kept: > 0.5
    assert mask.tolist() == [False, True, False, False, False, True, False, True, True, False]
