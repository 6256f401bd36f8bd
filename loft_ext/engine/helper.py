"""``LoFT``: filter-parallel training inside your own Accelerate loop, in the spirit of accelerate's
``LocalSGD``.

    loft = LoFT(accelerator, model, LoFTConfig(workers=2, local_steps=4))
    optimizer = torch.optim.AdamW(loft.model.parameters(), lr=1e-3)   # this rank's sub-network
    loft.attach(optimizer)
    for x, y in loader:
        loss = my_loss(loft.model(x), y)
        accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()
        loft.step()                      # every L steps: write back, sync, redraw, reload
    with loft.full_model() as full:      # the assembled model, e.g. for evaluation
        ...

With one process, ``loft.models`` holds all S simulated workers; with S x D processes each rank holds
one worker (``loft.model``), and D > 1 replicas of it train through DDP over the grid's replica group, or
sharded with FSDP2 (``LoFTConfig(replicas="fsdp")``; build the optimizer over ``loft.model.parameters()``,
which are then the rank's shards).
The recipe's loop (:mod:`loft_ext.engine.loop`) drives the same object through ``begin_round`` /
``end_round`` / ``finish_round``; plugins receive it as their ``run`` (:class:`loft_ext.plugins.LoftRun`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field as dc_field

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError
from ..hparams import Hparams, field
from ..models import default_input_shape
from ..parallel.grid import build_grid, check_world
from ..parallel.replicas import REPLICA_MODES, check_replicas
from ..parallel.sync import OPTIMIZER_STATE_MODES, STRATEGIES
from ..partition.plan import DEFAULT_PRESET, PRESET_HELP, PRESETS, make_plan
from ..plugins.base import Plugin, emit
from ..tracking import RunLogger
from .loft import LoFTEngine
from .state import LoFTState


@dataclass
class LoFTConfig(Hparams):
    """LoFT"""

    workers: int = field(2, "S: filter workers; each trains a 1/S-wide sub-network of the split groups")
    local_steps: int = field(4, "L: local steps per worker between two syncs (one round)")
    preset: str = field(DEFAULT_PRESET, PRESET_HELP, PRESETS)
    sync: str = field("allgather", "distributed sync: allgather or alltoall", STRATEGIES)
    optimizer_state: str = field("carry", "carry: every per-entry optimizer state tensor sliced and written back "
                                 "like the weights (the better model: docs/results.md, 'Pretraining quality'); "
                                 "reset: optimizer state cleared each round (the paper)",
                                 OPTIMIZER_STATE_MODES)
    seed: int = field(0, "seed of the per-round partitions")
    replicas: str = field("ddp", "D > 1 replicas of a worker: ddp (each holds the whole sub-network) or fsdp "
                          "(FSDP2-sharded over the D ranks: parameters, gradients and optimizer state 1/D per "
                          "rank); an execution choice, no-op with D = 1", REPLICA_MODES)

    def check(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (got {self.workers})")
        if self.local_steps < 1:
            raise ConfigError(f"local_steps must be >= 1 (got {self.local_steps})")
        for name, value, choices in (("preset", self.preset, PRESETS), ("sync", self.sync, STRATEGIES),
                                     ("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_MODES)):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
        check_replicas(self.replicas)


@dataclass
class RunState:
    """Where the run is: rounds done, epochs done, losses, evaluations and tickets so far."""

    round_index: int = 0
    epoch: int = 0
    local_step: int = 0                                              # steps done in the current round
    worker_losses: list[list[float]] = dc_field(default_factory=list)  # since the last epoch end
    round_losses: list[list[float]] = dc_field(default_factory=list)   # this round, per local worker
    history: list[dict] = dc_field(default_factory=list)
    tickets: list[dict] = dc_field(default_factory=list)


class LoFT(LoFTState):
    """Filter-parallel LoFT on top of an ``Accelerator`` (``None``: one process, workers simulated).

    ``model``: a timm CNN (its full parameters; each worker gets a physically narrower copy).
    ``input_shape``: (1, C, H, W) used to trace the channel graph (default: the model's timm config).
    ``plugins``: :class:`~loft_ext.plugins.Plugin` objects; they see every event, in list order.
    ``rounds`` / ``rounds_per_epoch``: known to the recipe's loop (progress, epoch ends); a user's loop
    may leave them at 0 / 1.
    """

    def __init__(self, accelerator, model: nn.Module, config: LoFTConfig, plugins=(), input_shape=None,
                 rounds: int = 0, rounds_per_epoch: int = 1, logger: RunLogger | None = None, plan=None,
                 start_round: int = 0, replicas_ddp: bool = True, grid_factory=build_grid):
        config.check()
        self.accelerator, self.config = accelerator, config
        self.local_steps = config.local_steps
        world = accelerator.num_processes if accelerator is not None else 1
        if world > 1:
            check_world(world, config.workers)
        if accelerator is not None and str(accelerator.distributed_type).endswith("FSDP"):
            raise ConfigError("this Accelerator was built with Accelerate's FSDP plugin (an FSDP config or "
                              "ACCELERATE_USE_FSDP), which shards whole models over every process; LoFT shards each "
                              "worker's sub-network over its own D ranks: build the Accelerator without the FSDP "
                              "plugin and pass LoFTConfig(replicas=\"fsdp\") (docs/fsdp.md)")
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
        self.plan = plan or make_plan(model, config.workers, config.preset,
                                      tuple(input_shape or default_input_shape(model)),
                                      type(model).__name__)
        model.to(device)
        self.grid = grid_factory(config.workers) if world > 1 else None
        precision = str(getattr(accelerator, "mixed_precision", "no")) if accelerator is not None else "no"
        self.engine = LoFTEngine(model, self.plan, config.seed, config.optimizer_state, grid=self.grid,
                                 strategy=config.sync, start_round=start_round, replicas_ddp=replicas_ddp,
                                 replicas=config.replicas, mixed_precision=precision)
        self.plugins: list[Plugin] = list(plugins)
        for p in self.plugins:
            if not isinstance(p, Plugin):
                raise ConfigError(f"plugins must be loft_ext.Plugin instances; got {type(p).__name__} "
                                  "(subclass loft_ext.Plugin, or create built-ins with loft_ext.create_plugin)")
        self.rounds, self.rounds_per_epoch = rounds, rounds_per_epoch
        self.logger = logger or RunLogger(None)
        self.state = RunState(round_index=start_round, worker_losses=[[] for _ in self.engine.workers])
        self.local_index = {w.index: i for i, w in enumerate(self.engine.workers)}
        self.stop = False
        self.preempted = False
        self.stop_reasons: list[str] = []
        self.preempt_requested = False
        self.failures: list[str] = []
        self._round_open = False
        self._started = False
        self._lr: float | None = None

    # ------------------------------------------------------------------ what a user's loop needs
    @property
    def models(self) -> list[nn.Module]:
        """Every local worker's trainable module (S of them in one process, one per rank otherwise)."""
        return [w.module for w in self.engine.workers]

    @property
    def model(self) -> nn.Module:
        """This process's worker's module (one worker per process; with S simulated workers use ``models``)."""
        if len(self.engine.workers) > 1:
            raise ConfigError(f"this process simulates all {len(self.engine.workers)} workers: train each of "
                              "loft.models (one optimizer each), or launch one process per worker (torchrun "
                              "--nproc_per_node S)")
        return self.engine.workers[0].module

    @property
    def worker_indices(self) -> list[int]:
        return [w.index for w in self.engine.workers]

    def attach(self, *optimizers: torch.optim.Optimizer, begin: bool = True) -> None:
        """The optimizer of each local worker, in ``models`` order (built over ``models[i].parameters()``);
        starts the first round unless one is open (``begin=False``: the caller's loop starts it)."""
        self.engine.attach_optimizers(list(optimizers))
        if begin and not self._round_open:
            self.begin_round()

    def step(self, loss: float | torch.Tensor | list | None = None) -> bool:
        """Call after every optimizer step (of every local worker). Every ``local_steps`` calls it ends
        the round (write-back, sync, plugins) and starts the next one; returns True then. Under
        ``accelerator.accumulate``, steps that only accumulate gradients are not counted."""
        if self.accelerator is not None and not self.accelerator.sync_gradients:
            return False
        if not self._round_open:
            self.begin_round()
        losses = loss if isinstance(loss, (list, tuple)) else [loss] * len(self.engine.workers)
        for w, value in zip(self.engine.workers, losses):
            if value is not None:
                value = float(value.detach()) if torch.is_tensor(value) else float(value)
                self.state.round_losses[self.local_index[w.index]].append(value)
                self.emit("on_local_step_end", w.index, self.state.local_step, value)
        self.state.local_step += 1
        if self.state.local_step < self.local_steps:
            return False
        self.end_round()
        self.finish_round()
        self.begin_round()
        return True

    @contextlib.contextmanager
    def full_model(self):
        """The assembled full model (identical on every rank); under ``alltoall`` it is gathered on entry
        and freed on exit. A collective: every rank must enter it."""
        model = self.engine.assembled()
        try:
            yield model
        finally:
            self.engine.release()

    @property
    def should_stop(self) -> bool:
        """A plugin (detector, preemption) asked to end training, agreed over all ranks."""
        return self.stop

    # ------------------------------------------------------------------ rounds (the recipe's loop)
    def begin_round(self, lr: float | None = None) -> None:
        """Draw round ``state.round_index``'s partition, load every local worker's slices and optimizer
        state (and ``lr`` into its optimizer when given)."""
        if not self._started:
            self._started = True
            self.emit("on_fit_start")
        r = self.state.round_index
        self._lr = lr
        self.engine.begin_round(r, lr)
        self.state.round_losses = [[] for _ in self.engine.workers]
        self.state.local_step = 0
        self._round_open = True
        self.emit("on_round_start", r)

    def end_round(self) -> tuple[bool, bool]:
        """Sync the round; plugins see the assembled model when they ask for it. Returns (stop, preempt),
        agreed over all ranks; raises TrainingFailure when a plugin reported one."""
        from ..errors import TrainingFailure

        r = self.state.round_index
        for mine, new in zip(self.state.worker_losses, self.state.round_losses):
            mine.extend(new)
        self.emit("on_before_sync", r)
        self.engine.sync()
        self._round_open = False
        self.state.round_index = r + 1
        epoch_end = self.is_epoch_end(r)
        round_losses = self.gather_losses(self.state.round_losses)
        sync = self.engine.comm.counters.get("sync")
        lr = {"lr": self._lr} if self._lr is not None else {}
        self.logger.log({**lr, "worker_loss": round_losses, "bytes_sent": sync.sent if sync else 0.0},
                        step=r + 1, kind="round")
        if any(p.wants_model(self, r, epoch_end) for p in self.plugins):
            with self.full_model() as model:
                self.emit("on_after_sync", r, model)
        else:
            self.emit("on_after_sync", r, None)
        stop, preempt, failed = self._agree()
        if failed:
            raise TrainingFailure(self.failures[0] if self.failures else
                                  f"another rank stopped the run in round {r + 1} (its message names the cause)")
        self.stop = stop
        self.preempted = preempt and (not self.rounds or self.state.round_index < self.rounds)
        return stop, preempt

    def finish_round(self) -> None:
        """The round is complete (after any evaluation): ``on_round_end`` (checkpoints are written here)."""
        self.emit("on_round_end", self.state.round_index - 1)

    def record_evaluation(self, metrics: dict, lr: float | None = None) -> dict:
        """Epoch-end bookkeeping: the epoch's mean worker losses join ``metrics``; plugins and trackers see it."""
        self.state.epoch += 1
        r = self.state.round_index
        metrics = {"epoch": self.state.epoch, "round": r, **({"lr": lr} if lr is not None else {}),
                   "worker_loss": self.gather_losses(self.state.worker_losses), **metrics}
        self.state.history.append(metrics)
        self.state.worker_losses = [[] for _ in self.engine.workers]
        self.emit("on_evaluation", metrics)
        self.logger.log(metrics, step=r, kind="epoch")
        self.emit("on_epoch_end", self.state.epoch, metrics)
        return metrics

    def end(self, metrics: dict | None = None) -> None:
        self.emit("on_fit_end", metrics or (self.state.history[-1] if self.state.history else {}))

    # ------------------------------------------------------------------ for plugins (LoftRun)
    def emit(self, event: str, *args) -> None:
        emit(self.plugins, event, self, *args)

    def is_epoch_end(self, round_index: int) -> bool:
        return (round_index + 1) % self.rounds_per_epoch == 0 or round_index + 1 == self.rounds

    @property
    def lr(self) -> float | None:
        """The learning rate of the round being trained: what ``begin_round`` got, else what the first
        local worker's optimizer holds (a loop that sets it there itself); None without either."""
        if self._lr is not None:
            return self._lr
        for w in self.engine.workers:
            if w.optimizer is not None and w.optimizer.param_groups:
                return float(w.optimizer.param_groups[0]["lr"])
        return None

    def request_stop(self, reason: str, preempt: bool = False) -> None:
        """Ask to end training after this round (agreed over all ranks). ``preempt``: the job is being
        stopped from outside; the run is checkpointed and left unfinished, not evaluated."""
        self.stop_reasons.append(reason)
        self.preempt_requested |= preempt

    def fail(self, message: str) -> None:
        """Report a failure (e.g. non-finite values): every rank raises TrainingFailure after this round's
        sync, before anything of the round is checkpointed."""
        self.failures.append(message)

    def ticket_found(self, detector: str, info: dict) -> None:
        """A detector says the ticket has emerged: recorded, logged, and passed to every plugin."""
        record = {"detector": detector, "round": self.state.round_index, **info}
        self.state.tickets.append(record)
        self.logger.log({f"ticket/{detector}": self.state.round_index}, step=self.state.round_index)
        self.emit("on_ticket_found", detector, record)

    def gather_losses(self, per_local_worker: list[list[float]]) -> list[float]:
        """Mean loss of every worker (gathered over the filter group in a distributed run)."""
        local = [sum(v) / max(len(v), 1) for v in per_local_worker]
        if self.grid is None:
            return local
        mine = torch.tensor(local, dtype=torch.float64)
        out = mine.new_empty(self.grid.workers)
        with self.engine.comm.phase("metric"):
            self.engine.comm.all_gather(out, mine, group=self.grid.filter_group)
        return out.tolist()

    def _agree(self) -> tuple[bool, bool, bool]:
        """(stop, preempt, failed), agreed by one all-reduce (max) so every rank acts alike."""
        flags = torch.tensor([float(bool(self.stop_reasons)), float(self.preempt_requested),
                              float(bool(self.failures))])
        if self.grid is not None:
            with self.engine.comm.phase("metric"):
                self.engine.comm.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, preempt, failed = (bool(v) for v in flags.tolist())
        if stop and not self.stop_reasons:
            self.stop_reasons.append("another rank's plugin asked to stop")
        return stop, preempt, failed


__all__ = ["LoFT", "LoFTConfig", "RunState"]
