"""Masks on disk and masks enforced during training.

A ticket's masks are saved as their own files: ``masks.safetensors`` (one boolean keep-mask per
tensor, loaded without executing any pickled code) and ``masks.json`` (kind, ratio, the kept units
of every split group for structured tickets, the sparsity report). They reload without the run that
made them.

:class:`MaskEnforcer` keeps pruned weights at exactly zero during fine-tuning: gradient hooks zero the
pruned entries' gradients (the only hook point under engines that step inside ``backward``, such as
DeepSpeed), and after every optimizer step the weights and every optimizer-state tensor shaped like
them (SGD momentum, Adam moments) are multiplied by the mask, so nothing regrows.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..partition.subnet import tensors_of


def save_masks(folder: str, masks: dict[str, torch.Tensor], meta: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file({n: m.contiguous().to(torch.bool).cpu() for n, m in masks.items()},
              os.path.join(folder, "masks.safetensors"))
    with open(os.path.join(folder, "masks.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_masks(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    masks = load_file(os.path.join(folder, "masks.safetensors"))
    with open(os.path.join(folder, "masks.json")) as f:
        return masks, json.load(f)


class MaskEnforcer:
    """Applies keep-masks to a model's tensors and keeps them applied through training."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        tensors = tensors_of(model)
        missing = [n for n in masks if n not in tensors]
        if missing:
            raise KeyError(f"masks name tensors this model does not have: {missing[:3]}")
        self.pairs = [(tensors[n], m.to(tensors[n].device)) for n, m in masks.items()]
        self.handles = []

    @torch.no_grad()
    def apply(self) -> None:
        for t, m in self.pairs:
            t.mul_(m)

    def hook_gradients(self) -> None:
        for t, m in self.pairs:
            if isinstance(t, nn.Parameter) and t.requires_grad:
                self.handles.append(t.register_hook(lambda g, m=m: g * m))

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.apply()
        for t, m in self.pairs:
            for value in optimizer.state.get(t, {}).values():
                if torch.is_tensor(value) and value.shape == t.shape:
                    value.mul_(m)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
