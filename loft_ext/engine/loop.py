"""A minimal LoFT training loop whose behaviour changes only through callbacks.

Per round: lr from the schedule -> ``begin_round`` (partition drawn, slices loaded) -> each worker
trains L local steps on its own batches -> ``sync`` -> evaluation at epoch ends. Logging, metrics and
(later) detectors and pruning are callbacks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .loft import LoFTEngine


class Callback:
    """Training-loop events, called in this order: fit_start, (round_start, local_step_end*,
    sync_end, [epoch_end])*, fit_end. ``loop.stop = True`` ends pretraining after the current round."""

    def on_fit_start(self, loop: "LoFTLoop") -> None: ...
    def on_round_start(self, loop: "LoFTLoop", round_index: int) -> None: ...
    def on_local_step_end(self, loop: "LoFTLoop", worker: int, step: int, loss: float) -> None: ...
    def on_sync_end(self, loop: "LoFTLoop", round_index: int) -> None: ...
    def on_epoch_end(self, loop: "LoFTLoop", epoch: int, metrics: dict) -> None: ...
    def on_fit_end(self, loop: "LoFTLoop", metrics: dict) -> None: ...


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
        model = copy.deepcopy(model)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for i, (x, _) in enumerate(recalibrate):
            if i >= recalibrate_batches:
                break
            model(x.to(device))
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    return {"test_loss": loss_sum / max(total, 1), "test_acc": correct / max(total, 1)}


@dataclass
class LoopState:
    round_index: int = 0
    epoch: int = 0
    worker_losses: list[list[float]] = field(default_factory=list)  # since the last epoch end
    history: list[dict] = field(default_factory=list)


class LoFTLoop:
    """Runs ``rounds`` LoFT rounds of ``local_steps`` steps per worker with simulated workers."""

    def __init__(self, engine: LoFTEngine, streams, test_loader: DataLoader, rounds: int,
                 local_steps: int, lr_fn, callbacks: list[Callback] = (),
                 rounds_per_epoch: int = 1, recalibrate: DataLoader | None = None,
                 recalibrate_batches: int = 0):
        self.engine = engine
        self.streams = streams
        self.test_loader = test_loader
        self.rounds = rounds
        self.local_steps = local_steps
        self.lr_fn = lr_fn
        self.callbacks = list(callbacks)
        self.rounds_per_epoch = rounds_per_epoch
        self.recalibrate = recalibrate
        self.recalibrate_batches = recalibrate_batches
        self.state = LoopState(worker_losses=[[] for _ in engine.workers])
        self.local_index = {w.index: i for i, w in enumerate(engine.workers)}
        self.stop = False

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def evaluate(self) -> dict:
        """Evaluate the assembled model (every rank does, so every rank holds the same metrics)."""
        model = self.engine.assembled()
        try:
            return evaluate(model, self.test_loader, self.recalibrate, self.recalibrate_batches)
        finally:
            self.engine.release()

    def worker_losses(self) -> list[float]:
        """Mean training loss of every worker since the last epoch end (gathered over the filter group)."""
        local = [sum(v) / max(len(v), 1) for v in self.state.worker_losses]
        grid = self.engine.grid
        if grid is None:
            return local
        mine = torch.tensor(local, dtype=torch.float64)
        out = mine.new_empty(grid.workers)
        with self.engine.comm.phase("metric"):
            self.engine.comm.all_gather(out, mine, group=grid.filter_group)
        return out.tolist()

    def fit(self) -> dict:
        self._emit("on_fit_start")
        metrics: dict = {}
        while self.state.round_index < self.rounds and not self.stop:
            r = self.state.round_index
            lr = self.lr_fn(r)
            self.engine.begin_round(r, lr)
            self._emit("on_round_start", r)
            for w in self.engine.workers:
                for step in range(self.local_steps):
                    x, y = self.streams[w.index].next()
                    loss = w.train_step(x, y)
                    self.state.worker_losses[self.local_index[w.index]].append(loss)
                    self._emit("on_local_step_end", w.index, step, loss)
            self.engine.sync()
            self.state.round_index = r + 1
            self._emit("on_sync_end", r)
            if (r + 1) % self.rounds_per_epoch == 0 or r + 1 == self.rounds or self.stop:
                self.state.epoch += 1
                metrics = {"epoch": self.state.epoch, "round": r + 1, "lr": lr,
                           "worker_loss": self.worker_losses(),
                           **self.evaluate()}
                self.state.history.append(metrics)
                self.state.worker_losses = [[] for _ in self.engine.workers]
                self._emit("on_epoch_end", self.state.epoch, metrics)
        self._emit("on_fit_end", metrics)
        return metrics
