"""The recipe's minimal LoFT training loop, a client of the :class:`loft_ext.LoFT` helper.

Per round: lr from the schedule -> ``loft.begin_round`` (partition drawn, slices loaded) -> each local
worker trains L local steps on its own batches (:func:`local_step`) -> ``loft.end_round`` (sync; plugins
see the assembled model if they asked for it) -> evaluation at epoch ends -> ``loft.finish_round``.
Progress, metrics, distances, detectors and checkpoints are plugins (:mod:`loft_ext.plugins`); every
number goes through a :class:`loft_ext.tracking.RunLogger`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..evaluation import evaluate


def lr_at(round_index: int, rounds: int, base_lr: float, schedule: str = "step",
          milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """Learning rate of a round: ``step`` divides by 1/gamma at each milestone (a fraction of the
    rounds); ``cosine`` anneals to 0; ``constant`` keeps ``base_lr``."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * round_index / max(rounds, 1)))
    if schedule == "step":
        passed = sum(1 for m in milestones if round_index >= m * rounds)
        return base_lr * gamma ** passed
    raise ValueError(f"unknown lr schedule {schedule!r}; choose step, cosine or constant")


def local_step(worker, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy,
               autocast=contextlib.nullcontext, memory_format=torch.contiguous_format,
               clip_norm: float = 0.0) -> float:
    """One optimizer step of one worker's sub-network (``worker.module``: DDP over its replicas when D > 1;
    under DeepSpeed its engine owns backward, the replicas' all-reduce and step)."""
    x = x.contiguous(memory_format=memory_format)
    if worker.ds_engine is not None:
        worker.ds_engine.train()
        with autocast():
            loss = loss_fn(worker.ds_engine(x), y)
        worker.ds_engine.backward(loss)
        if clip_norm > 0:
            nn.utils.clip_grad_norm_(worker.model.parameters(), clip_norm)
        worker.ds_engine.step()
        return loss.item()
    worker.module.train()
    with autocast():
        loss = loss_fn(worker.module(x), y)
    worker.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    worker.optimizer.step()
    return loss.item()


def fit(loft, streams, test_loader: DataLoader, step_fn=local_step, lr_fn=None, recalibrate: DataLoader | None = None,
        recalibrate_batches: int = 0) -> dict:
    """Train ``loft.rounds`` rounds (or until a plugin stops the run) and return the last epoch's metrics.

    ``streams[s]``: worker s's batch stream (``next()`` -> (x, y)); ``step_fn(worker, x, y)`` -> loss.
    """
    metrics: dict = loft.state.history[-1] if loft.state.history else {}
    while loft.state.round_index < loft.rounds and not loft.stop:
        r = loft.state.round_index
        lr = lr_fn(r) if lr_fn is not None else None
        loft.begin_round(lr)
        for w in loft.engine.workers:
            for step in range(loft.local_steps):
                loss = step_fn(w, *streams[w.index].next())
                loft.state.round_losses[loft.local_index[w.index]].append(loss)
                loft.emit("on_local_step_end", w.index, step, loss)
        stop, preempt = loft.end_round()
        if loft.is_epoch_end(r) or (stop and not preempt):
            with loft.full_model() as model:
                scores = evaluate(model, test_loader, recalibrate, recalibrate_batches)
            metrics = loft.record_evaluation(scores, lr)
        loft.finish_round()
        if preempt:
            break
    loft.end(metrics)
    return metrics
