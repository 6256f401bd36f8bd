"""A CI sample of the timm coverage sweep (``make coverage`` runs all families): every family either
splits exactly, or is refused with the reason; none crashes. Numbers: split groups at S=2, preset all,
input 64x64 (docs/results/timm_coverage.md), and for a few families the presets one_dim and one_dim_flops
(the default; docs/results/timm_coverage-one_dim{,_flops}.md)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from timm_coverage import run_one  # noqa: E402

# model -> (what it exercises, expected status, split groups at S=2)
SAMPLE = {
    "seresnet18": ("squeeze-excite", "split", 16),
    "ecaresnet26t": ("efficient channel attention", "split", 19),
    "gcresnext26ts": ("global context (LayerNorm inside the context branch)", "split", 3),
    "skresnet18": ("selective kernel", "split", 8),
    "resnest14d": ("split attention", "split", 7),
    "resnext26ts": ("grouped convs", "split", 11),
    "regnetx_002": ("grouped convs", "split", 14),
    "mobilenetv2_050": ("depthwise convs", "split", 20),
    "ghostnet_050": ("ghost modules: concat, then a channel slice", "split", 9),
    "dpn48b": ("dual path: concat + grouped", "split", 17),
    "ese_vovnet19b_slim_dw": ("one-shot aggregation (concat) + eSE gate", "split", 6),
    "cs3darknet_focus_s": ("CSP channel split", "split", 18),
    "convnext_atto": ("LayerNorm CNN", "split", 12),
    "nf_regnet_b0": ("norm-free, weight-standardised convs", "split", 1),
    "rexnet_100": ("partial-channel residual", "split", 31),
    "dla34": ("deep layer aggregation (concat)", "split", 16),
    "lcnet_050": ("depthwise + SE", "split", 17),
    "tinynet_e": ("inverted residuals", "split", 25),
    "hardcorenas_a": ("inverted residuals + hard SE", "split", 22),
    "resnet10t": ("basic blocks, deep stem", "split", 6),
    "lambda_resnet26t": ("lambda layers: B, C, H, W = x.shape, reshape(B, C, H, W)", "split", 13),
    "efficientvim_m1": ("a scalar tensor times the channels (scale * x)", "split", 13),
    "repvgg_a0": ("every conv output joins a residual add", "nothing", None),
    "vit_tiny_patch16_224": ("transformer", "nothing", None),
    "deit_tiny_patch16_224": ("transformer", "nothing", None),
    "resnetv2_50x1_bit": ("GroupNorm + weight-standardised convs", "nothing", None),
}
SLOW = {
    "densenet121": ("dense concat", "split", 58),
    "resnet50_gn": ("GroupNorm", "split", 33),
    "hrnet_w18_small": ("multi-resolution fusion", "split", 36),
}
CASES = [pytest.param(n, *v, id=n) for n, v in SAMPLE.items()] + \
        [pytest.param(n, *v, id=n, marks=pytest.mark.slow) for n, v in SLOW.items()]


@pytest.mark.parametrize("name, what, status, groups", CASES)
def test_family_splits_exactly_or_says_why(name, what, status, groups):
    rec = run_one(name, check_workers=(2,))
    assert rec["status"] == status, rec
    if status == "split":
        assert rec["groups"] == groups
        assert rec["exact"] and rec["failures"] == []
        assert 0 < rec["fraction"]["4"] < rec["fraction"]["2"] < 1
    else:
        assert rec["reason"].startswith(f"nothing in {name} can be split")


# preset one_dim (docs/results/timm_coverage-one_dim.md; the recipe's default until 2026-12-07): fewer groups
# (none that would cut a tensor an earlier split group already cuts along its other dim), each split still exact
ONE_DIM = {
    "efficientnet_b0": ("inverted residuals + squeeze-excite: the SE's reduced group stays shared", 18),
    "cspresnet50": ("CSP channel split", 18),
    "inception_v3": ("parallel branches concatenated", 28),
    "resnet14t": ("Bottleneck: conv2 -> conv3 stays shared; deep stem", 5),
}


@pytest.mark.parametrize("name, what, groups", [pytest.param(n, *v, id=n) for n, v in ONE_DIM.items()])
def test_preset_one_dim_splits_exactly(name, what, groups):
    rec = run_one(name, check_workers=(2, 4), preset="one_dim")
    assert rec["status"] == "split" and rec["groups"] == groups, rec
    assert rec["exact"] and rec["failures"] == []
    assert rec["groups"] < run_one(name, check_workers=(), preset="all")["groups"]


@pytest.mark.parametrize("name", ["efficientnet_b0", "inception_v3", "resnet14t"])
def test_the_cheapest_one_dim_cuts_split_exactly(name):
    """``one_dim_flops`` (docs/results/timm_coverage-one_dim_flops.md) chooses other groups than ``one_dim`` on
    these (a deep stem's chain, parallel branches, inverted residuals); each split is still exact."""
    rec = run_one(name, check_workers=(2, 4), preset="one_dim_flops")
    assert rec["status"] == "split" and rec["exact"] and rec["failures"] == [], rec


def test_sample_spans_the_issue_families():
    assert len(SAMPLE) + len(SLOW) >= 25
