"""Pruning, masks that never regrow, rewinding, compact export."""
import copy

import pytest
import torch
import torch.nn.functional as F

from loft_ext.partition.plan import make_plan
from loft_ext.partition.subnet import tensors_of
from loft_ext.tickets.export import compact_model, load_compact, save_compact
from loft_ext.tickets.masks import MaskEnforcer, load_masks, save_masks
from loft_ext.tickets.prune import (PruneError, magnitude_masks, random_ticket_like, structured_ticket,
                                    unit_scores)

from conftest import randomise_bn


def test_structured_keeps_the_exact_fraction_and_the_largest_norms(model_cache):
    model = model_cache("resnet18")
    plan = make_plan(model, 1, "all", model_name="resnet18")
    ticket = structured_ticket(model, plan, 0.3)
    for g, kept, score in zip(plan.split, ticket.kept, unit_scores(model, plan, "l2")):
        assert len(kept) == round(0.7 * g.units)
        dropped = torch.ones(g.units, dtype=torch.bool)
        dropped[kept] = False
        assert score[kept].min() >= score[dropped].max()  # largest kept (release defect 1 fixed)
    # the score is the L2 norm of the producer filters
    w = dict(model.named_parameters())["layer3.1.conv1.weight"]
    gi = [g.name for g in plan.split].index("layer3.1.conv1")
    torch.testing.assert_close(unit_scores(model, plan, "l2")[gi], w.detach().double().flatten(1).norm(dim=1))


def test_masks_cover_every_tensor_of_a_group_consistently(model_cache):
    model = model_cache("efficientnet_b0")
    plan = make_plan(model, 1, "paper", model_name="efficientnet_b0")
    ticket = structured_ticket(model, plan, 0.5)
    masks = ticket.masks(model)
    gi = [g.name for g in plan.split].index("blocks.2.1.conv_pw")
    kept = ticket.kept[gi]
    expect = torch.zeros(plan.split[gi].channels, dtype=torch.bool)
    expect[kept] = True
    p = "blocks.2.1."
    assert torch.equal(masks[p + "conv_pw.weight"][:, 0, 0, 0], expect)
    assert torch.equal(masks[p + "bn1.weight"], expect) and torch.equal(masks[p + "bn2.running_var"], expect)
    assert torch.equal(masks[p + "conv_dw.weight"][:, 0, 0, 0], expect)
    assert torch.equal(masks[p + "se.conv_reduce.weight"][0, :, 0, 0], expect)
    assert torch.equal(masks[p + "se.conv_expand.weight"][:, 0, 0, 0], expect)
    assert torch.equal(masks[p + "conv_pwl.weight"][0, :, 0, 0], expect)


def test_min_keep_and_global_scope(model_cache):
    model = model_cache("resnet18")
    plan = make_plan(model, 1, "all", model_name="resnet18")
    floor = structured_ticket(model, plan, 0.99, min_keep=40)
    assert [len(k) for k in floor.kept] == [40] * 8  # 1% of 64..512 would be 1..5
    glob = structured_ticket(model, plan, 0.5, scope="global", min_keep=4)
    total = sum(g.units for g in plan.split)
    assert sum(len(k) for k in glob.kept) == round(0.5 * total)
    assert min(len(k) for k in glob.kept) >= 4
    # global: the kept units are the best by score divided by the group's mean
    scores = unit_scores(model, plan, "l2")
    normalised = torch.cat([s / s.mean() for s in scores])
    kept = torch.cat([torch.isin(torch.arange(g.units), k) for g, k in zip(plan.split, glob.kept)])
    assert normalised[kept].min() >= normalised[~kept].max() - 1e-12
    with pytest.raises(PruneError, match=r"in \[0, 1\)"):
        structured_ticket(model, plan, 1.0)
    rand = random_ticket_like(glob, seed=3)
    assert [len(k) for k in rand.kept] == [len(k) for k in glob.kept]
    assert any(not torch.equal(a, b) for a, b in zip(rand.kept, glob.kept))


def test_grouped_conv_units_prune_whole_groups(model_cache):
    model = model_cache("regnetx_002")
    plan = make_plan(model, 1, "paper", model_name="regnetx_002")
    ticket = structured_ticket(model, plan, 0.5)
    gi = [g.name for g in plan.split].index("s4.b2.conv1.conv")
    mask = ticket.masks(model)["s4.b2.conv1.conv.weight"][:, 0, 0, 0].view(46, 8)
    assert (mask.all(1) | ~mask.any(1)).all() and mask.all(1).sum() == len(ticket.kept[gi]) == 23


def test_unstructured_magnitude_levels(model_cache):
    model = model_cache("resnet18")
    one = magnitude_masks(model, 0.2)
    two = magnitude_masks(model, 0.2, one)
    weights = {n: p for n, p in model.named_parameters() if n in one}
    assert "fc.weight" not in one  # classifier excluded
    total = sum(m.numel() for m in one.values())
    assert sum(int(m.sum()) for m in one.values()) == total - round(0.2 * total)
    alive = sum(int(m.sum()) for m in one.values())
    assert sum(int(m.sum()) for m in two.values()) == alive - round(0.2 * alive)
    assert all((~two[n] | one[n]).all() for n in one)  # survivors of level 2 survived level 1
    kept = torch.cat([weights[n].detach().abs()[one[n]] for n in one])
    pruned = torch.cat([weights[n].detach().abs()[~one[n]] for n in one])
    assert kept.min() >= pruned.max()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_regrowth_after_50_steps(model_cache, optimizer):
    model = copy.deepcopy(model_cache("resnet18", num_classes=10, in_chans=1))
    plan = make_plan(model, 1, "all", input_shape=(1, 1, 32, 32))
    masks = structured_ticket(model, plan, 0.5).masks(model)
    masks.update(magnitude_masks(model, 0.3, {n: m for n, m in masks.items() if n.endswith("conv1.weight")}))
    enforcer = MaskEnforcer(model, masks)
    enforcer.apply()
    enforcer.hook_gradients()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05))
    g = torch.Generator().manual_seed(0)
    tensors = tensors_of(model)
    for _ in range(50):
        x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        enforcer.after_step(opt)
        for n, m in masks.items():
            assert (tensors[n][~m] == 0).all(), n
    for n, m in masks.items():  # optimizer state of pruned entries stays zero too
        state = opt.state.get(tensors[n], {})
        for v in state.values():
            if torch.is_tensor(v) and v.shape == m.shape:
                assert (v[~m] == 0).all(), n


def test_no_regrowth_under_accelerate(model_cache):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = copy.deepcopy(model_cache("resnet18", num_classes=10, in_chans=1))
    masks = magnitude_masks(model, 0.5)
    enforcer = MaskEnforcer(model, masks)
    enforcer.apply()
    enforcer.hook_gradients()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped, opt = accelerator.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        loss = F.cross_entropy(wrapped(torch.randn(8, 1, 32, 32, generator=g)), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        enforcer.after_step(opt.optimizer)
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks.items())


def test_rewinding_restores_survivors_exactly(model_cache, tmp_path):
    init = copy.deepcopy(model_cache("resnet18"))
    trained = copy.deepcopy(init)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    masks = magnitude_masks(trained, 0.6)
    save_masks(str(tmp_path), masks, {"kind": "unstructured"})
    masks, meta = load_masks(str(tmp_path))  # a ticket reloads from its files alone
    assert meta["kind"] == "unstructured"
    rewound = copy.deepcopy(trained)
    rewound.load_state_dict(init.state_dict())
    MaskEnforcer(rewound, masks).apply()
    for n, p in rewound.named_parameters():
        if n in masks:
            assert torch.equal(p[masks[n]], dict(init.named_parameters())[n][masks[n]])
            assert (p[~masks[n]] == 0).all()
        else:
            assert torch.equal(p, dict(init.named_parameters())[n])


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnetv2_50", "efficientnet_b0", "mobilenetv3_small_100"])
def test_compact_export_equals_the_masked_model(model_cache, tmp_path, name):
    model = randomise_bn(copy.deepcopy(model_cache(name))).eval()
    plan = make_plan(model, 1, "all", model_name=name)
    ticket = structured_ticket(model, plan, 0.5)
    masked = copy.deepcopy(model)
    MaskEnforcer(masked, ticket.masks(masked)).apply()
    small = compact_model(model, ticket).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = masked(x)
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)
    expected = sum(torch.Size(plan.narrow_shape(n, tuple(p.shape), [len(k) for k in ticket.kept])).numel()
                   for n, p in model.named_parameters())
    assert sum(p.numel() for p in small.parameters()) == expected < sum(p.numel() for p in model.parameters())
    save_compact(str(tmp_path), small, name, 10, 3)
    loaded = load_compact(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
