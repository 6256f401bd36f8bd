"""Fine-tuning a ticket with its masks enforced, data-parallel over every process.

Every rank holds the same ticket, so ordinary DDP (``accelerator.prepare``) is right here, unlike
in LoFT pretraining. Masks are enforced by the :class:`~loft_ext.tickets.plugins.MaskEnforcement` plugin,
which a user's own fine-tuning loop can use the same way.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..evaluation import evaluate, recalibrate_bn
from .plugins import MaskEnforcement

OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def finetune(model: nn.Module, masks: dict[str, torch.Tensor], train_set, test_set, accelerator, *,
             epochs: int, lr: float, batch_size: int, optimizer: str = "sgd", momentum: float = 0.9,
             weight_decay: float = 5e-4, seed: int = 0, eval_batch_size: int = 256,
             memory_format: torch.memory_format = torch.contiguous_format, log=None,
             oneshot_bn_batches: int = 0) -> dict:
    """Cosine-annealed fine-tuning for ``epochs``; returns the final test metrics and the wall time.

    ``epochs=0`` evaluates the ticket as pruned, without training it (its one-shot accuracy: the pruned
    weights; with ``oneshot_bn_batches`` > 0 the BatchNorm statistics are first re-estimated in place on
    that many training batches, since removing channels shifts them), and returns the same keys with
    ``steps`` 0."""
    t0 = time.time()
    model.to(accelerator.device, memory_format=memory_format)
    enforcement = MaskEnforcement(model, masks)
    enforcement.start()
    if epochs == 0:
        enforcement.stop()
        if oneshot_bn_batches > 0:
            recalibrate_bn(model, DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed)), oneshot_bn_batches)
        metrics = {"epoch": 0, **evaluate(model, DataLoader(test_set, batch_size=eval_batch_size))}
        if log is not None:
            log(metrics)
        return {**metrics, "steps": 0, "wall_s": time.time() - t0}
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    if len(loader) == 0:
        raise ValueError(f"fine-tuning has no batch: {len(train_set)} training samples, batch size {batch_size}")
    inner = getattr(opt, "optimizer", opt)
    steps = max(1, epochs * len(loader))
    step = 0
    metrics: dict = {}
    for epoch in range(epochs):
        wrapped.train()
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with accelerator.autocast():
                loss = F.cross_entropy(wrapped(x.contiguous(memory_format=memory_format)), y)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            enforcement.after_step(inner)
            step += 1
        metrics = {"epoch": epoch + 1, "train_loss": float(loss.detach()),
                   **evaluate(accelerator.unwrap_model(wrapped),
                              DataLoader(test_set, batch_size=eval_batch_size))}
        if log is not None:
            log(metrics)
    enforcement.stop()
    accelerator.free_memory()
    return {**metrics, "steps": step, "wall_s": time.time() - t0}
