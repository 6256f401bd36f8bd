"""Sub-networks: exact slicing, S=1 identity, partial sums, and parameter counts."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import FAMILIES
from loft_ext.partition.plan import make_plan, units_per_worker
from loft_ext.partition.subnet import Slicer, build_subnet, covered_mask, draw_partition, tensors_of


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_slice_then_write_back_is_the_identity(model_cache, name, workers):
    full = copy.deepcopy(model_cache(name))
    plan = make_plan(full, workers, "all", model_name=name)
    original = {k: v.clone() for k, v in tensors_of(full).items()}
    part = draw_partition(plan, seed=3, round_index=11)
    subs = [build_subnet(full, plan, s) for s in range(workers)]
    slicers = [Slicer(plan, full, subs[s], s) for s in range(workers)]
    for sl in slicers:
        sl.load(part)
    # 1) writing back into the same model changes nothing, bit for bit
    for sl in slicers:
        sl.write_back(part)
    for k, v in tensors_of(full).items():
        assert torch.equal(v, original[k]), k
    # 2) writing back into a blank model restores exactly the entries the workers hold: every entry
    #    of a one-dim split tensor, the diagonal blocks of a tensor split on two dims
    with torch.no_grad():
        for k in plan.tensor_dims:
            tensors_of(full)[k].fill_(float("nan"))
    for sl in slicers:
        sl.write_back(part)
    for k in plan.tensor_dims:
        v = tensors_of(full)[k]
        covered = covered_mask(plan, part, k, v.shape)
        assert torch.equal(~torch.isnan(v), covered), k
        assert torch.equal(v[covered], original[k][covered]), k
        if len(plan.tensor_dims[k]) == 1:
            assert covered.all(), k
    # the sub-networks really are narrower modules of the same class that run forward
    x = torch.randn(2, 3, 64, 64)
    for sub in subs:
        assert type(sub) is type(full)
        sub.eval()
        assert sub(x).shape == (2, 10)
    assert sum(p.numel() for p in subs[-1].parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_channels_last_sub_networks_keep_the_layout_and_slicing_stays_exact(model_cache, name):
    """--channels_last: narrowed conv weights are channels_last too; slice -> write back is still the identity."""
    full = copy.deepcopy(model_cache(name)).to(memory_format=torch.channels_last)
    plan = make_plan(full, 3, "all", model_name=name)
    original = {k: v.clone() for k, v in tensors_of(full).items()}
    part = draw_partition(plan, seed=3, round_index=5)
    subs = [build_subnet(full, plan, s) for s in range(3)]
    for s, sub in enumerate(subs):
        Slicer(plan, full, sub, s).load(part)
        for k, t in tensors_of(sub).items():
            if t.dim() == 4:
                assert t.is_contiguous(memory_format=torch.channels_last), k
    for s, sub in enumerate(subs):
        Slicer(plan, full, sub, s).write_back(part)
    for k, v in tensors_of(full).items():
        assert torch.equal(v, original[k]), k
    with torch.no_grad():
        out = subs[0].eval()(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "regnetx_002"])
def test_single_worker_subnet_is_the_full_model(model_cache, name):
    full = model_cache(name).eval()
    plan = make_plan(full, 1, "all", model_name=name)
    sub = build_subnet(full, plan, 0)
    Slicer(plan, full, sub, 0).load(draw_partition(plan, 0, 7))
    sub.eval()
    for (k, a), (k2, b) in zip(tensors_of(full).items(), tensors_of(sub).items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(full(x), sub(x))


def _consumer_output(block, conv_name, x):
    out = {}
    handle = block.get_submodule(conv_name).register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    with torch.no_grad():
        block(x)
    handle.remove()
    return out["y"]


@pytest.mark.parametrize("name,block,consumer,cross", [
    ("resnet18", "layer3.1", "conv2", None),
    ("resnet50", "layer3.2", "conv3", "conv2"),
    ("mobilenetv3_small_100", "blocks.1.1", "conv_pwl", None),  # inverted residual without SE
])
def test_partial_sums_add_up_to_the_full_consumer_output(model_cache, name, block, consumer, cross):
    full = copy.deepcopy(model_cache(name)).eval()
    plan = make_plan(full, 3, "paper", model_name=name)
    part = draw_partition(plan, 0, 1)
    subs = [build_subnet(full, plan, s) for s in range(3)]
    for s, sub in enumerate(subs):
        Slicer(plan, full, sub, s).load(part)
        sub.eval()
    if cross:
        # a Bottleneck's 3x3 conv is split on both dims; workers compute its block diagonal only, so the
        # full model is compared with its off-diagonal blocks zeroed
        wname = f"{block}.{cross}.weight"
        w = tensors_of(full)[wname]
        with torch.no_grad():
            w.mul_(covered_mask(plan, part, wname, w.shape))
    blk = full.get_submodule(block)
    in_ch = next(m for m in blk.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, in_ch, 8, 8)
    want = _consumer_output(blk, consumer, x)
    got = sum(_consumer_output(sub.get_submodule(block), consumer, x) for sub in subs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the split is real: a single worker alone is far from the full output
    alone = _consumer_output(subs[0].get_submodule(block), consumer, x)
    assert (alone - want).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "regnetx_002"])
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_worker_parameter_count_is_shared_plus_its_share(model_cache, name, workers):
    full = model_cache(name)
    plan = make_plan(full, workers, "all", model_name=name)
    params = dict(full.named_parameters())
    shared = sum(p.numel() for n, p in params.items() if n not in plan.tensor_dims)
    for s in range(workers):
        # formula: shared + sum over split tensors of numel * prod over split dims (units_s / units)
        share = 0
        for n, entries in plan.tensor_dims.items():
            if n not in params:
                continue  # BN running statistics are buffers
            frac = 1.0
            for _, gi in entries:
                u = plan.split[gi].units
                frac *= units_per_worker(u, workers)[s] / u
            share += params[n].numel() * frac
        sub = build_subnet(full, plan, s)
        assert sum(p.numel() for p in sub.parameters()) == round(shared + share)
        assert plan.worker_numel(full, s) == round(shared + share)


def test_uneven_split_and_resnet18_count_by_hand(model_cache):
    full = model_cache("resnet18")
    plan = make_plan(full, 3, "paper", model_name="resnet18")
    # layer2.1 (128 ch), layer3.1 (256), layer4.1 (512) hidden groups dealt to 3 workers
    assert [units_per_worker(g.units, 3) for g in plan.split] == [[43, 43, 42], [86, 85, 85], [171, 171, 170]]
    n_full = sum(p.numel() for p in full.parameters())

    def split_params(c_in, w, c_out):  # conv1 rows + bn1 + conv2 columns of a BasicBlock
        return w * c_in * 9 + 2 * w + c_out * w * 9

    total_split = split_params(128, 128, 128) + split_params(256, 256, 256) + split_params(512, 512, 512)
    last = (split_params(128, 42, 128) + split_params(256, 85, 256) + split_params(512, 170, 512))
    sub = build_subnet(full, plan, 2)
    assert sum(p.numel() for p in sub.parameters()) == n_full - total_split + last
    assert sub.layer3[1].conv1.out_channels == 85 and sub.layer3[1].bn1.num_features == 85
    assert sub.layer3[1].conv2.in_channels == 85


def test_partition_is_a_function_of_seed_and_round(model_cache):
    plan = make_plan(model_cache("resnet50"), 4, "paper")
    a, b = draw_partition(plan, 5, 9), draw_partition(plan, 5, 9)
    c = draw_partition(plan, 5, 10)
    assert all(torch.equal(x, y) for ga, gb in zip(a.units, b.units) for x, y in zip(ga, gb))
    assert any(not torch.equal(x, y) for ga, gc in zip(a.units, c.units) for x, y in zip(ga, gc))
    for group, g in zip(a.units, plan.split):  # disjoint and complete
        assert torch.equal(torch.cat(group).sort().values, torch.arange(g.units))
