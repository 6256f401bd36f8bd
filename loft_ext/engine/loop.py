"""A minimal LoFT training loop whose behaviour changes only through plugins.

Per round: lr from the schedule -> ``begin_round`` (partition drawn, slices loaded) -> each local
worker trains L local steps on its own batches -> ``sync`` -> plugins see the assembled model if they
asked for it -> evaluation at epoch ends. Progress, metrics, distances and detectors are plugins
(:mod:`loft_ext.plugins`); every number goes through a :class:`loft_ext.tracking.RunLogger`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import TrainingFailure
from ..plugins.base import Plugin
from ..tracking import RunLogger
from .loft import LoFTEngine


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
    round_losses: list[list[float]] = field(default_factory=list)   # this round, per local worker
    history: list[dict] = field(default_factory=list)
    tickets: list[dict] = field(default_factory=list)


class LoFTLoop:
    """Runs ``rounds`` LoFT rounds of ``local_steps`` steps per local worker; plugins do the rest."""

    def __init__(self, engine: LoFTEngine, streams, test_loader: DataLoader, rounds: int,
                 local_steps: int, lr_fn, plugins: list[Plugin] = (),
                 rounds_per_epoch: int = 1, recalibrate: DataLoader | None = None,
                 recalibrate_batches: int = 0, logger: RunLogger | None = None):
        self.engine = engine
        self.streams = streams
        self.test_loader = test_loader
        self.rounds = rounds
        self.local_steps = local_steps
        self.lr_fn = lr_fn
        self.plugins = list(plugins)
        self.rounds_per_epoch = rounds_per_epoch
        self.recalibrate = recalibrate
        self.recalibrate_batches = recalibrate_batches
        self.logger = logger or RunLogger(None)
        self.state = LoopState(worker_losses=[[] for _ in engine.workers])
        self.local_index = {w.index: i for i, w in enumerate(engine.workers)}
        self.stop = False
        self.preempted = False  # the run ended on a preemption request (checkpointed, not finished)
        self.stop_reasons: list[str] = []
        self.preempt_requested = False
        self.failures: list[str] = []

    # ------------------------------------------------------------------ for plugins
    def emit(self, event: str, *args) -> None:
        for p in self.plugins:
            getattr(p, event)(self, *args)

    def is_epoch_end(self, round_index: int) -> bool:
        return (round_index + 1) % self.rounds_per_epoch == 0 or round_index + 1 == self.rounds

    def request_stop(self, reason: str, preempt: bool = False) -> None:
        """Ask the loop to end pretraining after this round (agreed over all ranks). ``preempt``: the
        job is being stopped from outside; the run is checkpointed and left unfinished, not evaluated."""
        self.stop_reasons.append(reason)
        self.preempt_requested |= preempt

    def fail(self, message: str) -> None:
        """Report a failure (e.g. non-finite values): every rank raises :class:`TrainingFailure` after
        this round's sync, before anything of the round is checkpointed."""
        self.failures.append(message)

    def ticket_found(self, detector: str, info: dict) -> None:
        """A detector says the ticket has emerged: recorded, logged, and passed to every plugin."""
        record = {"detector": detector, "round": self.state.round_index, **info}
        self.state.tickets.append(record)
        self.logger.log({f"ticket/{detector}": self.state.round_index}, step=self.state.round_index)
        self.emit("on_ticket_found", detector, record)

    def state_dict(self) -> dict:
        """The loop's and every plugin's state (JSON-serialisable), e.g. for a checkpoint."""
        state = {"loop": {"round_index": self.state.round_index, "epoch": self.state.epoch,
                          "history": self.state.history, "tickets": self.state.tickets,
                          "worker_losses": self.state.worker_losses},
                 "plugins": {p.name: p.state_dict() for p in self.plugins}}
        self.emit("on_checkpoint_save", state)
        return state

    def load_state_dict(self, state: dict) -> None:
        loop = state["loop"]
        self.state.round_index, self.state.epoch = loop["round_index"], loop["epoch"]
        self.state.history, self.state.tickets = list(loop["history"]), list(loop["tickets"])
        if "worker_losses" in loop:
            self.state.worker_losses = [list(v) for v in loop["worker_losses"]]
        for p in self.plugins:
            p.load_state_dict(state["plugins"].get(p.name, {}))
        self.emit("on_checkpoint_load", state)

    # ------------------------------------------------------------------ metrics
    def evaluate(self) -> dict:
        """Evaluate the assembled model (every rank does, so every rank holds the same metrics)."""
        model = self.engine.assembled()
        try:
            return evaluate(model, self.test_loader, self.recalibrate, self.recalibrate_batches)
        finally:
            self.engine.release()

    def _gather_losses(self, per_local_worker: list[list[float]]) -> list[float]:
        """Mean loss of every worker (gathered over the filter group in a distributed run)."""
        local = [sum(v) / max(len(v), 1) for v in per_local_worker]
        grid = self.engine.grid
        if grid is None:
            return local
        mine = torch.tensor(local, dtype=torch.float64)
        out = mine.new_empty(grid.workers)
        with self.engine.comm.phase("metric"):
            self.engine.comm.all_gather(out, mine, group=grid.filter_group)
        return out.tolist()

    def _agree(self) -> tuple[bool, bool, bool]:
        """(stop, preempt, failed), agreed by one all-reduce (max) so every rank acts alike."""
        flags = torch.tensor([float(bool(self.stop_reasons)), float(self.preempt_requested), float(bool(self.failures))])
        if self.engine.grid is not None:
            with self.engine.comm.phase("metric"):
                self.engine.comm.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, preempt, failed = (bool(v) for v in flags.tolist())
        if stop and not self.stop_reasons:
            self.stop_reasons.append("another rank's plugin asked to stop")
        return stop, preempt, failed

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        self.emit("on_fit_start")
        metrics: dict = self.state.history[-1] if self.state.history else {}
        while self.state.round_index < self.rounds and not self.stop:
            r = self.state.round_index
            lr = self.lr_fn(r)
            self.engine.begin_round(r, lr)
            self.emit("on_round_start", r)
            self.state.round_losses = [[] for _ in self.engine.workers]
            for w in self.engine.workers:
                for step in range(self.local_steps):
                    x, y = self.streams[w.index].next()
                    loss = w.train_step(x, y)
                    self.state.round_losses[self.local_index[w.index]].append(loss)
                    self.emit("on_local_step_end", w.index, step, loss)
            for mine, new in zip(self.state.worker_losses, self.state.round_losses):
                mine.extend(new)
            self.emit("on_before_sync", r)
            self.engine.sync()
            self.state.round_index = r + 1
            epoch_end = self.is_epoch_end(r)
            round_losses = self._gather_losses(self.state.round_losses)
            sync = self.engine.comm.counters.get("sync")
            self.logger.log({"lr": lr, "worker_loss": round_losses,
                             "bytes_sent": sync.sent if sync else 0.0}, step=r + 1, kind="round")
            model = None
            if any(p.wants_model(self, r, epoch_end) for p in self.plugins):
                model = self.engine.assembled()
            try:
                self.emit("on_after_sync", r, model)
            finally:
                if model is not None:
                    self.engine.release()
            stop, preempt, failed = self._agree()
            if failed:
                raise TrainingFailure(self.failures[0] if self.failures else
                                      f"another rank stopped the run in round {r + 1} (its message names the cause)")
            self.stop = stop
            if epoch_end or (stop and not preempt):
                self.state.epoch += 1
                metrics = {"epoch": self.state.epoch, "round": r + 1, "lr": lr,
                           "worker_loss": self._gather_losses(self.state.worker_losses), **self.evaluate()}
                self.state.history.append(metrics)
                self.state.worker_losses = [[] for _ in self.engine.workers]
                self.emit("on_evaluation", metrics)
                self.logger.log(metrics, step=r + 1, kind="epoch")
                self.emit("on_epoch_end", self.state.epoch, metrics)
            self.preempted = preempt and self.state.round_index < self.rounds
            self.emit("on_round_end", r)
            if preempt:
                break
        self.emit("on_fit_end", metrics)
        return metrics
