"""The partition plan: which channel groups of a model are split between S workers, and how.

A plan is computed once per (model, S, preset) from the channel analysis in :mod:`graph`. It lists
every split group with each tensor dimension the group runs along, and every channel group that stays
shared with the reason. Presets choose among the splittable groups:

- ``all``: every splittable group;
- ``paper``: as the authors' release: the stem, the classifier, the first stage and the first block of
  every later stage stay shared; the other blocks' internal groups are split;
- ``one_dim``: every splittable group, except that no tensor is divided between workers along two dims.
  Under ``all`` a Bottleneck's 3x3 conv is split on both dims (its input and output groups), so each
  worker holds one diagonal block of it and the off-diagonal blocks (half of the conv at S=2) are
  trained by no one in that round. ``one_dim`` splits the first group that reaches a tensor and keeps a
  later group that would cut the same tensor along another dim shared (a Bottleneck: conv1 -> conv2
  split, conv2 -> conv3 shared): every entry of every tensor is trained in every round, at the price of
  wider workers. The blocks' groups are decided before the stem's; resnet18/34 have no such tensor, so
  there it equals ``all`` (a deep stem's middle conv and an inverted residual's squeeze-excite have).
- ``one_dim_flops``: the rule of ``one_dim``, but of the groups that would cut one tensor along different dims
  it splits the set that saves the most multiply-adds together (counted in one forward pass at the plan's
  input shape; :func:`most_saving_groups`) instead of first come, blocks first. On resnet10t's deep stem it
  splits the middle conv's output (halving the middle and the last conv) rather than the first conv's: the
  two S=2 workers compute 1.02x the full model's FLOPs instead of ``one_dim``'s 1.20x (efficientnet_b0 at
  64 px 1.05x instead of 1.06x). A group made outside the residual blocks and read by a block (a Bottleneck
  ResNet's stem output) is split only where ``one_dim`` splits it: choosing by savings alone split it on
  resnet14t, each worker's blocks saw only part of the stem's features, and the model lost 2 to 3 points
  (docs/results.md); kept shared, resnet14t's workers compute 1.34x instead of ``one_dim``'s 1.47x. Never more
  FLOPs than ``one_dim``: its split set is among the candidates. The default (``DEFAULT_PRESET``).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .graph import NothingSplittable, PartitionError, TensorDim, analyse_channels

PRESETS = ("paper", "all", "one_dim", "one_dim_flops")
ONE_DIM_PRESETS = ("one_dim", "one_dim_flops")  # presets that divide no tensor along two dims
# since 2026-12-07: one_dim's model quality (10 paired seeds on resnet14t) at fewer FLOPs, the preset whose LoFT
# model also matched dense at equal total FLOPs (docs/results.md "The default: one_dim_flops")
DEFAULT_PRESET = "one_dim_flops"
PRESET_HELP = ("channel groups to split: 'paper' (stem, head, first stage and first block of each stage shared, "
               "as the authors' release), 'all' (every splittable group), 'one_dim' (all, but no tensor divided "
               "along two dims: a Bottleneck's conv2->conv3 group stays shared so every weight trains each round) or "
               "'one_dim_flops' (the default: one_dim's rule, choosing the cuts that save the most FLOPs, the stem's "
               "output split only where one_dim splits it: resnet10t 1.02x dense's FLOPs instead of 1.20x, resnet14t "
               "1.34x instead of 1.47x, model quality as one_dim's within the seeds' spread, docs/results.md)")


@dataclass(frozen=True)
class BlockInfo:
    """Where a module sits: its residual block, the stage holding the block, and their indices."""

    block: str
    stage: str
    stage_index: int
    block_index: int


@dataclass
class SplitGroup:
    """One channel group split between workers, with every tensor dimension it runs along."""

    name: str                     # the producer module, e.g. "layer2.1.conv1"
    channels: int
    units: int                    # indivisible units dealt to workers (channels, or whole conv groups)
    dims: list[TensorDim]
    grouped_convs: dict[str, int] = field(default_factory=dict)
    norm_groups: dict[str, int] = field(default_factory=dict)
    block: BlockInfo | None = None
    kind: str = "hidden"          # hidden (a split group) | stream (a residual stream, tickets only)

    def unit_size(self, d: TensorDim) -> int:
        return d.size // self.units

    def numel_per_unit(self) -> int:
        return self.channels // self.units


@dataclass
class SharedGroup:
    """A channel group that every worker holds whole, and why."""

    name: str
    channels: int
    reasons: list[str]


def units_per_worker(units: int, workers: int) -> list[int]:
    """How many units each worker gets when a permutation is dealt round-robin."""
    return [len(range(s, units, workers)) for s in range(workers)]


@dataclass
class PartitionPlan:
    model_name: str
    preset: str
    workers: int
    input_shape: tuple[int, ...]
    split: list[SplitGroup]
    shared: list[SharedGroup]

    # tensor name -> [(dim, index of the split group)], built once
    tensor_dims: dict[str, list[tuple[int, int]]] = field(init=False, repr=False)

    def __post_init__(self):
        self.tensor_dims = {}
        for gi, g in enumerate(self.split):
            for d in g.dims:
                self.tensor_dims.setdefault(d.name, []).append((d.dim, gi))
        for entries in self.tensor_dims.values():
            entries.sort()

    # ------------------------------------------------------------------ shapes and counts
    def units_of(self, worker: int) -> list[int]:
        """Units of every split group held by ``worker`` (same every round)."""
        return [units_per_worker(g.units, self.workers)[worker] for g in self.split]

    def sub_shape(self, name: str, full_shape: tuple[int, ...], worker: int) -> tuple[int, ...]:
        return self.narrow_shape(name, full_shape, self.units_of(worker))

    def narrow_shape(self, name: str, full_shape: tuple[int, ...], units: list[int]) -> tuple[int, ...]:
        """Shape of tensor ``name`` when split group g keeps ``units[g]`` of its units."""
        shape = list(full_shape)
        for dim, gi in self.tensor_dims.get(name, ()):
            shape[dim] = full_shape[dim] // self.split[gi].units * units[gi]
        return tuple(shape)

    def worker_numel(self, model: nn.Module, worker: int) -> int:
        """Parameters held by ``worker``: shared ones whole plus its share of every split tensor."""
        total = 0
        for name, p in model.named_parameters():
            n = p.numel()
            for dim, gi in self.tensor_dims.get(name, ()):
                g = self.split[gi]
                n = n // g.units * units_per_worker(g.units, self.workers)[worker]
            total += n
        return total

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        lines = [f"partition plan: {self.model_name}, preset={self.preset}, S={self.workers}: "
                 f"{len(self.split)} split groups, {len(self.shared)} shared"]
        for g in self.split:
            where = f" [{g.block.block}]" if g.block else ""
            lines.append(f"  split  {g.name:<34} {g.channels:>5} ch in {g.units:>4} units, "
                         f"{len(g.dims):>2} tensor dims{where}")
        for g in self.shared:
            lines.append(f"  shared {g.name or '<input>':<34} {g.channels:>5} ch: {'; '.join(g.reasons)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model_name, "preset": self.preset, "workers": self.workers,
            "input_shape": list(self.input_shape),
            "split": [{
                "name": g.name, "channels": g.channels, "units": g.units,
                "block": g.block.block if g.block else None,
                "tensors": [{"name": d.name, "dim": d.dim, "size": d.size, "role": d.role,
                             "buffer": d.buffer} for d in g.dims],
                "grouped_convs": g.grouped_convs, "norm_groups": g.norm_groups,
            } for g in self.split],
            "shared": [{"name": g.name, "channels": g.channels, "reasons": g.reasons}
                       for g in self.shared],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _is_stage_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList)) or type(m).__name__.endswith("Stage")


def block_index(model: nn.Module) -> dict[str, BlockInfo]:
    """Map every module name to the block it belongs to.

    A block is the nearest ancestor (not the module itself) that is a child of a stage container
    (nn.Sequential, nn.ModuleList or a class named ``*Stage``): ``layer2.1`` in a ResNet,
    ``blocks.3.0`` in an EfficientNet, ``stages.1.blocks.0`` in a ResNetV2, ``s2.b1`` in a RegNet.
    """
    modules = dict(model.named_modules())
    stage_order: list[str] = []
    infos: dict[str, BlockInfo] = {}
    for name, module in modules.items():
        if next(module.children(), None) is not None:
            continue  # containers are never producers; skipping them keeps stage order clean
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            block, stage = ".".join(parts[:cut]), ".".join(parts[:cut - 1])
            if _is_stage_container(modules[stage]) and stage != "":
                if stage not in stage_order:
                    stage_order.append(stage)
                children = [n for n, _ in modules[stage].named_children()]
                infos[name] = BlockInfo(block, stage, stage_order.index(stage),
                                        children.index(parts[cut - 1]))
                break
    return infos


def weight_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-adds of every convolution and linear weight (by state_dict key) in one eval-mode forward pass
    at ``input_shape``: what dividing that weight between workers divides. Running statistics are untouched."""
    macs: dict[str, int] = {}

    def count(name):
        def hook(module, inputs, output):
            per_output = module.weight[0].numel()  # in_channels / groups x kernel (conv) or in_features (linear)
            macs[f"{name}.weight"] = macs.get(f"{name}.weight", 0) + output.numel() * per_output
        return hook

    handles = [m.register_forward_hook(count(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(m, "weight", None) is not None]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def _base_reasons(sp, info: BlockInfo | None, preset: str, workers: int) -> list[str]:
    """Why a channel space stays shared whatever else is split: the graph's barriers, the ``paper`` preset's
    places, too few or indivisible units."""
    reasons = list(sp.barriers)
    if not reasons and preset == "paper":
        if info is None:
            reasons.append("preset paper: outside the residual blocks (stem or head)")
        elif info.stage_index == 0:
            reasons.append("preset paper: first stage")
        elif info.block_index == 0:
            reasons.append("preset paper: first block of its stage")
    if not reasons and sp.units < workers:
        reasons.append(f"{sp.units} indivisible units, fewer than S={workers} workers")
    if not reasons and any(sp.channels % sp.units or d.size % sp.units for d in sp.dims):
        reasons.append("tensor sizes not divisible into whole units")
    return reasons


def _block_tensor_of_stem_group(sp, blocks: dict[str, BlockInfo]) -> str | None:
    """The first block tensor that a group produced outside the residual blocks runs along (the stem's output
    entering the first block), or None. Under ``one_dim_flops`` such a group is split only where ``one_dim``
    splits it: on a Bottleneck ResNet the savings would split it, each worker's blocks would then see only part
    of the stem's features, and that cost resnet14t 2 to 3 points (docs/results.md)."""
    if sp.producer in blocks:
        return None
    return next((d.name for d in sp.dims if d.name.rsplit(".", 1)[0] in blocks), None)


def _blocks_first(spaces, blocks: dict[str, BlockInfo]) -> list[int]:
    """one_dim's order: the blocks' groups first (a stem group must not take a block's tensors), then the rest,
    each in graph order."""
    return sorted(range(len(spaces)), key=lambda i: (spaces[i].producer not in blocks, i))


def _shared_reasons(spaces, base: list[list[str]], order: list[int], preset: str) -> list[list[str]]:
    """Why each group stays shared (empty: split) when the groups are taken in ``order`` and, under a one_dim
    preset, a group that would cut a tensor some earlier split group cuts along another dim stays shared."""
    cut: dict[str, tuple[int, str]] = {}  # tensor -> (dim, group) of the split group that divides it
    reasons: list[list[str]] = [[] for _ in spaces]
    for i in order:
        sp = spaces[i]
        reasons[i] = list(base[i])
        if not reasons[i] and preset in ONE_DIM_PRESETS:
            crossing = next(((d, cut[d.name]) for d in sp.dims if d.name in cut and cut[d.name][0] != d.dim), None)
            if crossing:
                d, (other_dim, group) = crossing
                reasons[i].append(f"preset {preset}: {d.name} is already split along dim {other_dim} by {group}")
        if not reasons[i]:
            for d in sp.dims:
                cut.setdefault(d.name, (d.dim, sp.producer))
    return reasons


EXACT_COMPONENT = 40  # conflict components up to this many groups are chosen exactly


def most_saving_groups(saved: dict[int, int], dims: dict[int, list[TensorDim]]) -> set[int]:
    """Groups (keys of ``saved``, the multiply-adds their split saves) that divide no tensor along two dims
    and save the most together: a maximum-weight independent set of the graph whose edges join two groups
    cutting one tensor along different dims. Savings add up (a tensor is cut by one group at most), so each
    connected component is solved on its own: exactly by branching on its busiest group (memoised) up to
    ``EXACT_COMPONENT`` groups, beyond that greedily (most saving first), never below first-come in graph
    order. Ties go to the set with the earliest groups, so the choice is deterministic."""
    by_tensor: dict[str, list[tuple[int, int]]] = {}
    for i, ds in dims.items():
        for d in ds:
            by_tensor.setdefault(d.name, []).append((d.dim, i))
    nbr: dict[int, set[int]] = {i: set() for i in saved}
    for cuts in by_tensor.values():
        for dim_a, a in cuts:
            for dim_b, b in cuts:
                if a != b and dim_a != dim_b:
                    nbr[a].add(b)
    def key(chosen: frozenset) -> tuple:
        return sum(saved[i] for i in chosen), tuple(-i for i in sorted(chosen))

    def greedy(order: list[int]) -> frozenset:
        chosen: set[int] = set()
        for i in order:
            if not nbr[i] & chosen:
                chosen.add(i)
        return frozenset(chosen)

    memo: dict[frozenset, frozenset] = {}

    def exact(left: frozenset) -> frozenset:
        if not left:
            return frozenset()
        if left not in memo:
            v = max(left, key=lambda u: (len(nbr[u] & left), -u))
            without = exact(left - {v})
            memo[left] = max(without, exact(left - {v} - nbr[v]) | {v}, key=key) if nbr[v] & left else without | {v}
        return memo[left]

    chosen: set[int] = set()
    seen: set[int] = set()
    for start in sorted(saved):
        if start in seen:
            continue
        component, stack = set(), [start]
        while stack:
            i = stack.pop()
            if i not in component:
                component.add(i)
                stack.extend(nbr[i] - component)
        seen |= component
        if len(component) <= EXACT_COMPONENT:
            chosen |= exact(frozenset(component))
        else:
            chosen |= max(greedy(sorted(component, key=lambda i: (-saved[i], i))), greedy(sorted(component)), key=key)
    return chosen


def make_plan(model: nn.Module, workers: int, preset: str = DEFAULT_PRESET,
              input_shape: tuple[int, ...] = (1, 3, 64, 64), model_name: str | None = None
              ) -> PartitionPlan:
    """Analyse ``model`` and choose the groups to split between ``workers`` workers."""
    model_name = model_name or type(model).__name__
    if not isinstance(workers, int) or workers < 1:
        raise PartitionError(f"the number of filter workers S must be an integer >= 1, got {workers!r}")
    if preset not in PRESETS:
        raise PartitionError(f"unknown partition preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spaces = analyse_channels(model, input_shape, model_name)
    blocks = block_index(model)
    base = [_base_reasons(sp, blocks.get(sp.producer), preset, workers) for sp in spaces]
    if preset == "one_dim_flops" and workers > 1:
        # the stem's output follows one_dim: split only where one_dim's blocks-first order splits it
        one_dim = _shared_reasons(spaces, base, _blocks_first(spaces, blocks), "one_dim")
        for i, sp in enumerate(spaces):
            entry = _block_tensor_of_stem_group(sp, blocks)
            if not base[i] and entry and one_dim[i]:
                base[i].append(f"preset one_dim_flops: made outside the residual blocks and read by them ({entry}), "
                               f"shared as under one_dim (there {one_dim[i][0].removeprefix('preset one_dim: ')})")
        # the splittable groups that save the most multiply-adds together are decided first; every other one
        # then meets a tensor they cut along another dim and stays shared
        candidates = [i for i in range(len(spaces)) if not base[i]]
        macs = weight_macs(model, input_shape) if candidates else {}  # no forward pass when nothing can split
        saved = {i: sum(macs.get(name, 0) for name in {d.name for d in spaces[i].dims}) for i in candidates}
        first = most_saving_groups(saved, {i: spaces[i].dims for i in saved})
        order = sorted(range(len(spaces)), key=lambda i: (i not in first, i))
    elif preset == "one_dim":
        order = _blocks_first(spaces, blocks)
    else:
        order = list(range(len(spaces)))
    reasons = _shared_reasons(spaces, base, order, preset) if workers > 1 else base
    split, shared = [], []
    for i, sp in enumerate(spaces):  # the plan keeps the graph order
        if reasons[i]:
            shared.append(SharedGroup(sp.producer, sp.channels, reasons[i]))
        else:
            dims = sorted(set(sp.dims), key=lambda d: (d.name, d.dim))
            split.append(SplitGroup(sp.producer, sp.channels, sp.units, dims, dict(sp.grouped_convs),
                                    dict(sp.norm_groups), blocks.get(sp.producer)))
    if workers > 1 and not split:
        counts = Counter(r for g in shared for r in g.reasons)
        why = "; ".join(f"{n} x {r}" for r, n in counts.most_common(6))
        hint = " Try --preset all or" if preset != "all" else " Try"
        raise NothingSplittable(
            f"nothing in {model_name} can be split between S={workers} workers with preset "
            f"{preset!r} ({why}).{hint} a model with residual blocks such as resnet18.")
    return PartitionPlan(model_name, preset, workers, tuple(input_shape), split, shared)
