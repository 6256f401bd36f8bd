"""Exactness check of a partition plan on a real model (used by the coverage sweep and the tests).

For one drawn partition of ``plan``:

1. every unit of every split group is held by exactly one worker;
2. each worker's physically narrower sub-network computes exactly what the full model computes when
   the channels the worker does not hold are cut (their consumer columns zeroed: no conv/linear reads
   them), in eval mode with random BatchNorm statistics and affine parameters so that a wrongly
   sliced norm or gate shows;
3. a round in which nothing is trained (load every worker's slices, write them all back) leaves every
   parameter and buffer of the full model bit-for-bit unchanged.

:func:`check_plan` returns a list of failure sentences (empty when everything holds).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn

from .plan import PartitionPlan
from .subnet import Partition, Slicer, build_subnet, draw_partition, tensors_of


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine parameters for every BatchNorm / GroupNorm / LayerNorm: every
    channel gets its own values, so a misplaced channel shows. Scales are drawn in [0.25, 0.75]: with
    scales around 1 a deep network is chaotic (efficientnetv2_m amplified float32 rounding to the size of
    its output, and float64 rounding to 1e-5 of it), which would hide a slicing error behind rounding."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@torch.no_grad()
def cut_model(full: nn.Module, plan: PartitionPlan, part: Partition, worker: int) -> nn.Module:
    """A copy of ``full`` in which no conv/linear reads a split channel ``worker`` does not hold."""
    cut = copy.deepcopy(full)
    tensors = tensors_of(cut)
    for gi, g in enumerate(plan.split):
        for d in g.dims:
            if d.role != "consumer":
                continue
            t = tensors[d.name]
            keep = torch.zeros(t.shape[d.dim], dtype=torch.bool)
            keep[part.index(plan, gi, worker, t.shape[d.dim] // g.units)] = True
            view = [1] * t.dim()
            view[d.dim] = t.shape[d.dim]
            t.mul_(keep.view(view).to(t.dtype))
    return cut


def check_units(plan: PartitionPlan, part: Partition) -> list[str]:
    failures = []
    for gi, g in enumerate(plan.split):
        held = torch.cat([part.units[gi][w] for w in range(plan.workers)])
        if not torch.equal(held.sort().values, torch.arange(g.units)):
            failures.append(f"group {g.name}: units are not held by exactly one worker each")
    return failures


def _compare(full: nn.Module, plan: PartitionPlan, part: Partition, x: torch.Tensor, rtol: float) -> list[str]:
    failures = []
    for w in range(plan.workers):
        sub = build_subnet(full, plan, w).eval()
        Slicer(plan, full, sub, w).load(part)
        want = cut_model(full, plan, part, w)(x)
        got = sub(x)
        if got.shape != want.shape:
            failures.append(f"worker {w}: sub-network output shape {tuple(got.shape)} != {tuple(want.shape)}")
            continue
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        if not err <= rtol * scale:  # relative: damped outputs can be small; also catches NaN
            failures.append(f"worker {w}: sub-network differs from the cut full model by {err:.3g} "
                            f"(output scale {scale:.3g}, {str(x.dtype).replace('torch.', '')})")
    return failures


@torch.no_grad()
def check_plan(model: nn.Module, plan: PartitionPlan, seed: int = 0, round_index: int = 1,
               rtol: float = 1e-4) -> list[str]:
    """Run the three checks above on a copy of ``model``; return the failures (empty: exact).

    The outputs are compared in float32 (relative tolerance ``rtol``) and, where they differ, again in
    float64 (1e-9): rounding (a different summation order in the narrower convs) shrinks with the
    precision, a wrong slice does not. The random norm scales keep deep models from amplifying it
    (:func:`randomize_norms`).
    """
    full = copy.deepcopy(model).eval()
    randomize_norms(full, seed)
    part = draw_partition(plan, seed, round_index)
    failures = check_units(plan, part)
    x = torch.randn((2,) + tuple(plan.input_shape[1:]), generator=torch.Generator().manual_seed(seed))
    x = x.to(next(itertools.chain(full.parameters(), full.buffers()), x).device)
    differs = _compare(full, plan, part, x, rtol)
    if differs:
        differs = _compare(copy.deepcopy(full).double(), plan, part, x.double(), 1e-9)
    failures += differs
    before = {n: t.detach().clone() for n, t in tensors_of(full).items()}
    for w in range(plan.workers):  # a round with nothing trained: load every worker, write all back
        sub = build_subnet(full, plan, w)
        slicer = Slicer(plan, full, sub, w)
        slicer.load(part)
        slicer.write_back(part)
    changed = [n for n, t in tensors_of(full).items() if not torch.equal(t, before[n])]
    if changed:
        failures.append(f"an untrained round changed {len(changed)} tensors (first: {changed[0]})")
    return failures
