"""Pruning: structured (whole channel units of the split groups) and unstructured (global magnitude).

Structured, LoFT style: for every split group, the units (channels, or whole conv groups) are scored
(``l2``: L2 norm of the producer filters of the unit; ``bn``: |gamma| of the group's first norm, the
Early-Bird / network-slimming criterion; ``random``: a seeded random score, the control) and the
largest-scored are kept. ``per-group`` keeps round((1 - r) * units) of every group; ``global`` divides
each group's scores by their mean and keeps the largest (1 - r) of all units together. Every group
keeps at least ``min_keep`` units (or all of them, when smaller), so no layer collapses. The mask of
a group covers every tensor dim of the group (producer rows, norm entries incl. running statistics,
consumer columns, depthwise/grouped conv rows, squeeze-excite rows and columns).

``hidden+stream`` adds the residual-stream channel groups (:mod:`loft_ext.tickets.stream`) to the
split groups and prunes every group per-group; a stream's channels are scored by a group score over
all its coupled tensors (every block adding into the stream, downsample convs, norms, the head).

Unstructured, lottery-ticket style: global magnitude pruning of conv/linear weights; each level
removes the fraction ``r`` of the weights that survive the previous level (one-shot = one level);
the classifier can be excluded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..partition.plan import PartitionPlan
from ..partition.subnet import Partition, slice_indices, tensors_of
from loft_ext.errors import ConfigError

SCORES = ("l2", "bn", "random")
SCOPES = ("per-group", "global", "hidden+stream")
STREAM_SCOPES = ("hidden+stream",)


class PruneError(ConfigError):
    """A pruning ratio or setting that cannot work; the message names the flag and the valid range."""


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise PruneError(f"pruning ratio must be in [0, 1), got {ratio}")


@dataclass
class StructuredTicket:
    """Kept units of every split group of ``plan`` (a plan made with S=1)."""

    plan: PartitionPlan
    kept: list[torch.Tensor]      # per group: sorted unit ids that survive
    ratio: float
    score: str

    def as_partition(self) -> Partition:
        return Partition(-1, [[k] for k in self.kept])

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of every tensor the split groups touch (True = kept)."""
        part = self.as_partition()
        out = {}
        for name, t in tensors_of(model).items():
            if name not in self.plan.tensor_dims:
                continue
            mask = torch.ones(t.shape, dtype=torch.bool)
            for dim, idx in slice_indices(self.plan, part, name, t.shape, 0):
                keep = torch.zeros(t.shape[dim], dtype=torch.bool)
                keep[idx] = True
                view = [1] * t.dim()
                view[dim] = -1
                mask &= keep.view(view)
            out[name] = mask
        return out

    def report(self) -> list[dict]:
        return [{"group": g.name, "kind": g.kind, "units": g.units, "kept_units": len(k), "channels": g.channels,
                 "kept_channels": len(k) * (g.channels // g.units)} for g, k in zip(self.plan.split, self.kept)]


def unit_scores(model: nn.Module, plan: PartitionPlan, score: str, seed: int = 0) -> list[torch.Tensor]:
    """One score per unit of every split group (larger = more important)."""
    if score not in SCORES:
        raise PruneError(f"unknown pruning score {score!r}; choose one of {', '.join(SCORES)}")
    tensors = tensors_of(model)
    g_rand = torch.Generator().manual_seed(seed)
    out = []
    for g in plan.split:
        if score == "random":
            out.append(torch.rand(g.units, generator=g_rand, dtype=torch.float64))
            continue
        if g.kind == "stream":
            from .stream import group_scores
            out.append(group_scores(model, g, score))
            continue
        role, suffix = ("producer", ".weight") if score == "l2" else ("norm", ".weight")
        dim = next((d for d in g.dims if d.role == role and d.name.endswith(suffix)), None)
        if dim is None:
            raise PruneError(f"score {score!r} needs a {role} weight in group {g.name}; use --prune_score l2")
        t = tensors[dim.name].detach().double().cpu()
        w = t.movedim(dim.dim, 0).reshape(t.shape[dim.dim], -1)  # one row per channel
        per_channel = w.pow(2).sum(1) if score == "l2" else w.abs().sum(1)
        per_unit = per_channel.view(g.units, -1).sum(1)
        out.append(per_unit.sqrt() if score == "l2" else per_unit)
    return out


def structured_ticket(model: nn.Module, plan: PartitionPlan, ratio: float, scope: str = "per-group",
                      score: str = "l2", min_keep: int = 1, seed: int = 0) -> StructuredTicket:
    """Keep the largest-scored units of every split group (see the module docstring)."""
    check_ratio(ratio)
    if scope not in SCOPES:
        raise PruneError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if min_keep < 1:
        raise PruneError(f"--min_keep must be >= 1 (got {min_keep})")
    if scope in STREAM_SCOPES:
        from .stream import with_streams
        plan = with_streams(model, plan)
    scores = unit_scores(model, plan, score, seed)
    floors = [min(min_keep, g.units) for g in plan.split]
    if scope != "global":
        counts = [max(f, int(round((1 - ratio) * g.units))) for g, f in zip(plan.split, floors)]
    else:
        normalised = torch.cat([s / s.mean().clamp_min(1e-30) for s in scores])
        owner = torch.cat([torch.full((g.units,), i) for i, g in enumerate(plan.split)])
        total = len(normalised)
        order = torch.sort(normalised, descending=True, stable=True).indices
        counts = list(floors)
        budget = int(round((1 - ratio) * total)) - sum(floors)
        taken = [0] * len(plan.split)
        for unit in order.tolist():  # floors first, then the best units of any group
            gi = int(owner[unit])
            taken[gi] += 1
            if taken[gi] > floors[gi] and budget > 0:
                counts[gi] += 1
                budget -= 1
    kept = [torch.sort(s, descending=True, stable=True).indices[:c].sort().values
            for s, c in zip(scores, counts)]
    return StructuredTicket(plan, kept, ratio, score)


def prunable_weights(model: nn.Module, exclude_classifier: bool = True) -> dict[str, nn.Parameter]:
    """Conv and linear weights (the classifier's excluded if asked)."""
    skip = set()
    if exclude_classifier and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) not in skip}


def magnitude_masks(model: nn.Module, ratio: float, previous: dict[str, torch.Tensor] | None = None,
                    exclude_classifier: bool = True) -> dict[str, torch.Tensor]:
    """One level of global magnitude pruning: remove ``ratio`` of the weights that survive ``previous``."""
    check_ratio(ratio)
    weights = prunable_weights(model, exclude_classifier)
    previous = previous or {}
    alive = {n: previous.get(n, torch.ones(w.shape, dtype=torch.bool)) for n, w in weights.items()}
    values = torch.cat([w.detach().abs().cpu()[alive[n]].flatten() for n, w in weights.items()])
    prune = int(round(ratio * values.numel()))
    if prune == 0:
        return alive
    threshold = torch.sort(values).values[prune - 1]
    masks, removed = {}, 0
    for n, w in weights.items():  # remove everything below the threshold, then ties in order
        a = w.detach().abs().cpu()
        below = alive[n] & (a < threshold)
        masks[n], removed = alive[n] & ~below, removed + int(below.sum())
    for n, w in weights.items():
        if removed >= prune:
            break
        ties = (masks[n] & (w.detach().abs().cpu() == threshold)).flatten().nonzero().flatten()
        take = ties[:prune - removed]
        flat = masks[n].flatten().clone()
        flat[take] = False
        masks[n], removed = flat.view(masks[n].shape), removed + len(take)
    return masks


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Kept / total entries per masked tensor and over the whole model's parameters."""
    params = dict(model.named_parameters())
    layers = {n: {"kept": int(m.sum()), "total": m.numel()} for n, m in masks.items() if n in params}
    total = sum(p.numel() for p in params.values())
    pruned = sum(v["total"] - v["kept"] for v in layers.values())
    return {"layers": layers, "params_total": total, "params_kept": total - pruned,
            "sparsity": pruned / total}


def random_ticket_like(ticket: StructuredTicket, seed: int = 0) -> StructuredTicket:
    """Random units with the same number kept in every group as ``ticket`` (the control)."""
    g = torch.Generator().manual_seed(seed + 7919)
    kept = [torch.randperm(grp.units, generator=g)[:len(k)].sort().values
            for grp, k in zip(ticket.plan.split, ticket.kept)]
    return StructuredTicket(ticket.plan, kept, ticket.ratio, "random")


def random_masks_like(masks: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random unstructured masks with the same number of survivors in every tensor."""
    g = torch.Generator().manual_seed(seed + 7919)
    out = {}
    for name, m in masks.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[:int(m.sum())]] = True
        out[name] = flat.view(m.shape)
    return out
