"""Residual-stream channel groups for structured tickets (``--prune_scope hidden+stream``).

The channel analysis of :mod:`loft_ext.partition.graph` already finds every channel space of a model;
the ones LoFT cannot split because a residual add joins them are the *residual streams*: each is one
space holding every producer that adds into the stream (the last conv of each block, the downsample
conv, the stem conv that starts it), every norm on it, and every consumer that reads it (the first
conv of each block, the next stage's downsample, the head's conv or classifier). Pruning a stream
channel removes that channel from all of these tensors at once, as a dependency-graph pruner does.

A space is a prunable stream when its only barriers are residual adds: spaces that reach the model
input or output, are concatenated, reshaped, normalised across channels or used by an unknown op stay
whole. Stream channels are scored by a *group score* over all coupled tensors (:func:`group_scores`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..partition.graph import analyse_channels
from ..partition.plan import PartitionPlan, SplitGroup, block_index
from ..partition.subnet import tensors_of

RESIDUAL = "joined by a residual"


def stream_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[SplitGroup]:
    """Every residual-stream channel group of ``model`` (kind ``stream``), with all its tensor dims."""
    blocks = block_index(model)
    out = []
    for sp in analyse_channels(model, input_shape):
        if not sp.barriers or not all(b.startswith(RESIDUAL) for b in sp.barriers):
            continue
        if any(sp.channels % sp.units or d.size % sp.units for d in sp.dims):
            continue
        dims = sorted(set(sp.dims), key=lambda d: (d.name, d.dim))
        out.append(SplitGroup(f"stream:{sp.producer}", sp.channels, sp.units, dims, dict(sp.grouped_convs),
                              dict(sp.norm_groups), blocks.get(sp.producer), kind="stream"))
    return out


def with_streams(model: nn.Module, plan: PartitionPlan) -> PartitionPlan:
    """``plan`` (S=1) with the model's residual-stream groups added after its hidden groups."""
    hidden = [g for g in plan.split if g.kind != "stream"]
    return PartitionPlan(plan.model_name, plan.preset, plan.workers, plan.input_shape,
                         hidden + stream_groups(model, plan.input_shape), list(plan.shared))


def group_scores(model: nn.Module, group: SplitGroup, score: str) -> torch.Tensor:
    """One score per unit of ``group`` from every coupled tensor (larger = more important).

    ``l2``: for each parameter dim of the group (producer rows, norm weights and biases, consumer
    columns, grouped-conv rows, gate rows), the squared L2 norm of every channel's slice, divided by
    that tensor's mean so that no single tensor dominates; the unit score is the square root of the
    sum over tensors. ``bn``: the same sum of |gamma| over every norm weight of the group.
    """
    tensors = tensors_of(model)
    total = torch.zeros(group.units, dtype=torch.float64)
    used = 0
    for d in group.dims:
        if d.buffer or (score == "bn" and not (d.role == "norm" and d.name.endswith(".weight"))):
            continue
        t = tensors[d.name].detach().double().cpu()
        w = t.movedim(d.dim, 0).reshape(t.shape[d.dim], -1)
        per = w.pow(2).sum(1) if score == "l2" else w.abs().sum(1)
        per_unit = per.view(group.units, -1).sum(1)
        total += per_unit / per_unit.mean().clamp_min(1e-30)
        used += 1
    if used == 0:
        from .prune import PruneError
        raise PruneError(f"score {score!r} needs a norm weight in stream group {group.name}; use --prune_score l2")
    return total.sqrt() if score == "l2" else total


def stream_report(plan: PartitionPlan, kept: list[torch.Tensor]) -> dict:
    """Channels kept over all hidden and all stream groups."""
    out = {}
    for kind in ("hidden", "stream"):
        groups = [(g, k) for g, k in zip(plan.split, kept) if g.kind == kind]
        out[kind] = {"groups": len(groups), "channels": sum(g.channels for g, _ in groups),
                     "kept_channels": sum(len(k) * (g.channels // g.units) for g, k in groups)}
    return out

