"""The LoFT engine: the full model, the workers' sub-networks, and one round's load / train / sync.

Without a process grid it simulates all S workers in one process (the ``LocalSync`` strategy: copies
and means). With a grid each rank holds one worker and a strategy from :mod:`loft_ext.parallel.sync`
moves the same values by collectives; D > 1 replicas of a worker train through DDP over its data group, or
(``replicas="fsdp"``) as one FSDP2-sharded copy over the mesh's shard dimension (:mod:`loft_ext.parallel.sharded`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..parallel.comm import Comm
from ..parallel.grid import FilterGrid
from ..parallel.replicas import check_replicas, wrap_replicas
from ..parallel.shard_sync import ShardedAllGatherSync, ShardedAllToAllSync
from ..parallel.sync import OPTIMIZER_STATE_MODES, STRATEGIES, AllGatherSync, AllToAllSync, LocalSync
from ..partition.plan import PartitionPlan
from ..partition.subnet import Partition, Slicer, build_subnet, draw_partition


class Worker:
    """One filter worker: its narrower sub-network, the slicer that feeds it, and (once attached) the
    optimizer a training loop steps. ``module`` is what the loop calls (and what its optimizer is built
    over): the sub-network, DDP over it when the worker has D > 1 replicas, or its FSDP-sharded copy
    (``sharded``) under ``replicas="fsdp"``; ``model`` is always the bare sub-network the round loads and
    writes back."""

    def __init__(self, index: int, full: nn.Module, plan: PartitionPlan):
        self.index = index
        self.model = build_subnet(full, plan, index)
        self.module: nn.Module = self.model
        self.slicer = Slicer(plan, full, self.model, index)
        self.optimizer: torch.optim.Optimizer | None = None
        self.param_names = {p: n for n, p in self.model.named_parameters()}
        self.ds_engine = None          # a DeepSpeedEngine over self.model (loft_ext.parallel.ds)
        self.before_load: Callable[[], None] | None = None  # e.g. give the plain copy storage again (FSDP)
        self.after_load: Callable[[], None] | None = None  # e.g. push values into DeepSpeed's master copy
        self.before_sync: Callable[[], None] | None = None  # e.g. gather FSDP shards into ``model``
        self.sharded = None            # a ShardedReplica (loft_ext.parallel.sharded) under replicas="fsdp"
        self.zero_state = None         # a ZeroCarriedState (loft_ext.parallel.ds): carried state under ZeRO 1-3

    def live_state(self, name: str) -> dict:
        """The optimizer's own state of sub-network parameter ``name`` (empty when it has none yet); under
        FSDP the state of its sharded copy (DTensors of the sub-network's shape)."""
        if self.optimizer is None:
            return {}
        if self.zero_state is not None:  # ZeRO keeps it in flat partitions: the mirror gathered before the sync
            return self.zero_state.state_mirror.get(name, {})
        p = self.sharded.param(name) if self.sharded is not None else self.model.get_parameter(name)
        return self.optimizer.state.get(p, {})

    def state_of(self, name: str) -> dict:
        """The optimizer state of parameter ``name`` as whole sub-network-shaped tensors, for a sync strategy
        to read and write: the optimizer's own entry, or under FSDP the replica's mirror of it (gathered
        before a sync, pushed into the shards after a load: :class:`~loft_ext.parallel.sharded.ShardedReplica`;
        under ZeRO 1-3 likewise :class:`~loft_ext.parallel.ds.ZeroCarriedState`)."""
        mirror = self.sharded or self.zero_state
        if mirror is not None:
            return mirror.state_mirror.setdefault(name, {})
        return self.optimizer.state[self.model.get_parameter(name)]


class LoFTEngine:
    """Holds the full model and this process's workers; loads a round's slices and syncs them.

    The engine never trains: a loop (the recipe's, or a user's through :class:`loft_ext.LoFT`) steps
    each worker's sub-network with its own optimizer between :meth:`begin_round` and :meth:`sync`.
    ``optimizer_state``: ``reset`` clears every worker's optimizer state at the start of each round (the
    paper: a new optimizer per round); ``carry`` keeps full-size copies of every per-entry state tensor
    (SGD momentum, Adam's moments) that are sliced and written back exactly like the weights.
    ``replicas``: how D > 1 replicas of a worker train: ``ddp`` (each holds the whole sub-network) or
    ``fsdp`` (sharded over the D ranks; ``mixed_precision="bf16"`` gives FSDP's bf16 policy). With D = 1
    (or no grid) it changes nothing.
    """

    def __init__(self, model: nn.Module, plan: PartitionPlan, seed: int = 0, optimizer_state: str = "reset",
                 grid: FilterGrid | None = None, comm: Comm | None = None, strategy: str = "allgather",
                 start_round: int = 0, replicas_ddp: bool = True, make_optimizer=None, replicas: str = "ddp",
                 mixed_precision: str = "no"):
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ConfigError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"sync strategy must be one of {STRATEGIES}, got {strategy!r}")
        check_replicas(replicas)
        self.full = model
        self.plan = plan
        self.seed = seed
        self.optimizer_state = optimizer_state
        self.grid = grid
        self.comm = comm or Comm(grid.nodes if grid is not None else None)
        local = range(plan.workers) if grid is None else [grid.filter_index]
        self.workers = [Worker(s, model, plan) for s in local]
        self.partition: Partition | None = None
        self.replicas = replicas
        self.mesh = None  # the grid as a DeviceMesh (loft_ext.parallel.mesh), built once when FSDP needs it
        if grid is None:
            self.strategy = LocalSync(self.workers, plan, optimizer_state)
        else:
            args = (self.workers[0], plan, grid, self.comm, optimizer_state, self.draw)
            shards = replicas == "fsdp" and grid.replicas > 1 and replicas_ddp
            if strategy == "allgather":
                self.strategy = (ShardedAllGatherSync if shards else AllGatherSync)(*args)
            else:
                self.strategy = (ShardedAllToAllSync if shards else AllToAllSync)(*args, start_round)
            if replicas_ddp:  # False under DeepSpeed: its engine owns the replicas' gradients
                self.mesh = wrap_replicas(self.workers[0], grid, self.comm, replicas, mixed_precision,
                                          carry=optimizer_state == "carry")
            if isinstance(self.strategy, ShardedAllGatherSync):
                self.workers[0].before_sync = None  # the sync moves shards: no full-parameter gather first
        if make_optimizer is not None:  # e.g. ``lambda params: torch.optim.SGD(params, lr=0.1)``
            self.attach_optimizers([make_optimizer(w.module.parameters()) for w in self.workers])

    @property
    def full_opt_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state kept across rounds (owned by the sync strategy)."""
        return self.strategy.opt_state

    def attach_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """The optimizer of each local worker (built by the loop over ``worker.model``'s parameters)."""
        if len(optimizers) != len(self.workers):
            raise ConfigError(f"one optimizer per local worker: got {len(optimizers)} for {len(self.workers)}")
        for w, opt in zip(self.workers, optimizers):
            opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
            mine = {id(p) for p in w.module.parameters()}  # DDP's are the sub-network's; FSDP's its shards
            theirs = [p for g in opt.param_groups for p in g["params"]]
            if not theirs or any(id(p) not in mine for p in theirs):
                raise ConfigError(f"worker {w.index}'s optimizer must be built over that worker's sub-network "
                                  "(loft.models[i].parameters()), not over the full model")
            w.optimizer = opt

    def draw(self, round_index: int) -> Partition:
        return draw_partition(self.plan, self.seed, round_index)

    # ---------------------------------------------------------------------------- round
    def begin_round(self, round_index: int, lr: float | None = None) -> Partition:
        """Draw the round's partition and load every local worker's slices, optimizer state and lr."""
        self.partition = self.draw(round_index)
        for w in self.workers:
            if w.before_load is not None:
                w.before_load()
        self.strategy.load(self.partition)
        for w in self.workers:
            if w.after_load is not None:
                w.after_load()
            if lr is not None and w.optimizer is not None:
                for group in w.optimizer.param_groups:
                    group["lr"] = lr
        return self.partition

    @torch.no_grad()
    def sync(self) -> None:
        """Write split slices back (disjoint copies) and average everything every worker holds."""
        if self.partition is None:
            raise RuntimeError("sync() before begin_round()")
        for w in self.workers:
            if w.before_sync is not None:
                w.before_sync()
        with self.comm.phase("sync"):
            self.strategy.sync(self.partition, self.draw(self.partition.round_index + 1))

    def assembled(self) -> nn.Module:
        """The full model with this round's values (gathered first under ``alltoall``); call
        :meth:`release` when done with it."""
        return self.strategy.assemble()

    def release(self) -> None:
        self.strategy.release()
