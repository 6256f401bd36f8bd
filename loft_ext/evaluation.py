"""Test loss and accuracy of a model, optionally after re-estimating its BatchNorm statistics.

A utility under both pretraining (``loft_ext.engine``) and the ticket stage (``loft_ext.tickets``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, batches: int) -> nn.Module:
    """Re-estimates ``model``'s BatchNorm running statistics in place on ``batches`` batches of ``loader``
    (a cumulative average; the weights are untouched)."""
    device = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(device))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, recalibrate: DataLoader | None = None,
             recalibrate_batches: int = 0) -> dict:
    """Test loss and accuracy of ``model``.

    With ``recalibrate_batches`` > 0 the BatchNorm running statistics of a copy are re-estimated on that
    many training batches first: workers' BN statistics were gathered on partial sums of their
    narrower sub-networks, not on the assembled model's activations. The training model is untouched.
    """
    device = next(model.parameters()).device
    if recalibrate_batches > 0 and recalibrate is not None:
        model = recalibrate_bn(copy.deepcopy(model), recalibrate, recalibrate_batches)
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    return {"test_loss": loss_sum / max(total, 1), "test_acc": correct / max(total, 1)}
