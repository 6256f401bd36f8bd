"""Compact export: a structured ticket as a physically smaller model of the same timm class.

Pruned units are removed from every tensor of their group (the sub-network machinery of
:mod:`loft_ext.partition.subnet` with one "worker" that holds the kept units), so parameters, FLOPs
and latency really fall. Saved as ``compact.safetensors`` (weights) and ``compact.json`` (timm model
name, classes, input channels, the narrowed conv/norm group counts); :func:`load_compact` rebuilds it
from those two files alone.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..models import create_model
from ..partition.subnet import fix_module_attributes, narrow_model, read_slice, set_tensor, slice_indices, tensors_of
from .prune import StructuredTicket


@torch.no_grad()
def compact_model(model: nn.Module, ticket: StructuredTicket) -> nn.Module:
    """The physically smaller model holding exactly the kept units of ``model``."""
    plan, part = ticket.plan, ticket.as_partition()
    small = narrow_model(model, plan, [len(k) for k in ticket.kept])
    full, dest = tensors_of(model), tensors_of(small)
    for name, t in full.items():
        if name in plan.tensor_dims:
            dest[name].copy_(read_slice(t, slice_indices(plan, part, name, t.shape, 0)))
    return small


def _groups(model: nn.Module) -> dict[str, int]:
    return {n: m.groups if isinstance(m, nn.Conv2d) else m.num_groups for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 or isinstance(m, nn.GroupNorm)}


def save_compact(folder: str, small: nn.Module, model_name: str, num_classes: int, in_chans: int) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in small.state_dict().items()},
              os.path.join(folder, "compact.safetensors"))
    with open(os.path.join(folder, "compact.json"), "w") as f:
        json.dump({"model": model_name, "num_classes": num_classes, "in_chans": in_chans,
                   "groups": _groups(small), "params": sum(p.numel() for p in small.parameters())}, f, indent=1)


def load_compact(folder: str) -> nn.Module:
    """Rebuild a compact ticket from its folder alone (weights-only loading, no pickled code)."""
    with open(os.path.join(folder, "compact.json")) as f:
        meta = json.load(f)
    state = load_file(os.path.join(folder, "compact.safetensors"))
    model = create_model(meta["model"], meta["num_classes"], meta["in_chans"])
    live = tensors_of(model)
    for name, value in state.items():
        if name in live and live[name].shape != value.shape:
            set_tensor(model, name, torch.empty(value.shape, dtype=value.dtype))
    fix_module_attributes(model, meta["groups"])
    model.load_state_dict(state, strict=True)
    return model
