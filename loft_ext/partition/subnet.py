"""Per-round partitions, physically narrower sub-networks, and exact slice / write-back.

A :class:`Partition` says which units of every split group each worker holds in one round. It is a
pure function of (run seed, round index), so every process computes the same one without talking.
A sub-network is built once per worker: a deep copy of the full timm model whose split tensors are
replaced by narrower ones (same module classes, fewer channels). Its Parameter objects never change;
each round only their values are overwritten, so optimizers and engines wrap them once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .plan import PartitionPlan


@dataclass
class Partition:
    """The units of every split group held by every worker in one round (sorted ascending)."""

    round_index: int
    units: list[list[torch.Tensor]]  # units[group][worker] -> LongTensor of unit ids

    def index(self, plan: PartitionPlan, group: int, worker: int, unit_size: int) -> torch.Tensor:
        """Channel indices along a tensor dim whose unit is ``unit_size`` entries wide."""
        u = self.units[group][worker]
        if unit_size == 1:
            return u
        return (u[:, None] * unit_size + torch.arange(unit_size)).reshape(-1)


def draw_partition(plan: PartitionPlan, seed: int, round_index: int) -> Partition:
    """Per split group, a fresh uniform permutation of its units dealt round-robin to S workers.

    Drawn from (seed, round index) alone: every rank computes it without communication. Each worker's
    units are sorted so that with S=1 the sub-network keeps the full model's channel order.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, round_index])))
    units = []
    for g in plan.split:
        perm = torch.from_numpy(rng.permutation(g.units))
        units.append([perm[s::plan.workers].sort().values for s in range(plan.workers)])
    return Partition(round_index, units)


def slice_indices(plan: PartitionPlan, part: Partition, name: str, shape, worker: int):
    """[(dim, index tensor)] for every split dim of tensor ``name`` (full ``shape``) held by ``worker``."""
    out = []
    for dim, gi in plan.tensor_dims.get(name, ()):
        g = plan.split[gi]
        out.append((dim, part.index(plan, gi, worker, shape[dim] // g.units)))
    return out


def covered_mask(plan: PartitionPlan, part: Partition, name: str, shape) -> torch.Tensor:
    """Entries of tensor ``name`` (full ``shape``) that some worker holds in ``part``: all of a tensor
    split along one dim, the diagonal blocks of one split along two (what a write-back restores)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for worker in range(plan.workers):
        held = torch.ones(shape, dtype=torch.bool)
        for dim, idx in slice_indices(plan, part, name, shape, worker):
            along = torch.zeros(shape[dim], dtype=torch.bool)
            along[idx] = True
            view = [1] * len(shape)
            view[dim] = shape[dim]
            held &= along.view(view)
        mask |= held
    return mask


def read_slice(full: torch.Tensor, idx: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    out = full
    for dim, ix in idx:
        out = out.index_select(dim, ix.to(full.device))
    return out


def write_slice(full: torch.Tensor, sub: torch.Tensor, idx: list[tuple[int, torch.Tensor]]) -> None:
    """Copy ``sub`` into the entries of ``full`` selected by ``idx`` (an exact copy, no arithmetic)."""
    if not idx:
        full.copy_(sub)
        return
    (dim, ix), rest = idx[0], idx[1:]
    ix = ix.to(full.device)
    if rest:
        block = full.index_select(dim, ix)
        write_slice(block, sub, rest)
        sub = block
    full.index_copy_(dim, ix, sub)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out that way (``--channels_last``), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state_dict name (the live tensors, not copies)."""
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(getattr(owner, attr), nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=getattr(owner, attr).requires_grad))
    else:
        owner._buffers[attr] = value


def build_subnet(full: nn.Module, plan: PartitionPlan, worker: int) -> nn.Module:
    """Worker ``worker``'s narrower copy of ``full`` (values are loaded per round by :class:`Slicer`)."""
    return narrow_model(full, plan, plan.units_of(worker))


def narrow_model(full: nn.Module, plan: PartitionPlan, units: list[int]) -> nn.Module:
    """A copy of ``full`` in which split group g keeps ``units[g]`` units (values left at zero for the
    split tensors): a worker's sub-network, or a compact ticket."""
    sub = copy.deepcopy(full)
    for name, t in tensors_of(full).items():
        if name in plan.tensor_dims:
            shape = plan.narrow_shape(name, tuple(t.shape), units)
            set_tensor(sub, name, torch.empty(shape, dtype=t.dtype, device=t.device,
                                              memory_format=memory_format_of(t)).zero_())
    grouped = {}
    for gi, g in enumerate(plan.split):
        for conv, groups in g.grouped_convs.items():
            grouped[conv] = groups // g.units * units[gi]
        for norm, groups in g.norm_groups.items():
            grouped[norm] = groups // g.units * units[gi]
    fix_module_attributes(sub, grouped)
    return sub


def fix_module_attributes(model: nn.Module, groups: dict[str, int]) -> None:
    """Make convs, linears and norms agree with their (narrowed) tensors; ``groups`` holds the new
    ``groups`` / ``num_groups`` of grouped convs and GroupNorms."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.groups = groups.get(name, m.groups)
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.GroupNorm):
            m.num_groups = groups.get(name, m.num_groups)
            if m.weight is not None:
                m.num_channels = m.weight.shape[0]


class Slicer:
    """Moves values between the full model and one worker's sub-network for a given partition."""

    def __init__(self, plan: PartitionPlan, full: nn.Module, sub: nn.Module, worker: int):
        self.plan, self.worker, self.full = plan, worker, full
        self.full_tensors = tensors_of(full)
        self.sub_tensors = tensors_of(sub)
        self.split_names = [n for n in self.full_tensors if n in plan.tensor_dims]
        self.shared_names = [n for n in self.full_tensors if n not in plan.tensor_dims]

    def indices(self, part: Partition, name: str):
        return slice_indices(self.plan, part, name, self.full_tensors[name].shape, self.worker)

    @torch.no_grad()
    def load(self, part: Partition) -> None:
        """Copy this worker's slices (and every shared tensor) from the full model into the sub-net."""
        for name in self.split_names:
            self.sub_tensors[name].copy_(read_slice(self.full_tensors[name], self.indices(part, name)))
        for name in self.shared_names:
            self.sub_tensors[name].copy_(self.full_tensors[name])

    @torch.no_grad()
    def write_back(self, part: Partition) -> None:
        """Copy this worker's split slices from the sub-net into the full model (shared ones untouched)."""
        for name in self.split_names:
            write_slice(self.full_tensors[name], self.sub_tensors[name], self.indices(part, name))
