"""The LoFT engine: the full model, the workers' sub-networks, and one round's load / train / sync.

Without a process grid it simulates all S workers in one process (sync by in-process copies and
means). With a grid each rank holds one worker and a strategy from :mod:`loft_ext.parallel.sync`
moves the same values by collectives.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..partition.plan import PartitionPlan
from ..parallel.comm import Comm
from ..parallel.grid import FilterGrid
from ..parallel.sync import STRATEGIES, AllGatherSync, AllToAllSync
from ..partition.subnet import Partition, Slicer, build_subnet, draw_partition, read_slice, write_slice

OPTIMIZER_STATE_MODES = ("reset", "carry")


class Worker:
    """One filter worker: its narrower sub-network, the slicer that feeds it, and its optimizer."""

    def __init__(self, index: int, full: nn.Module, plan: PartitionPlan,
                 make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        self.index = index
        self.model = build_subnet(full, plan, index)
        self.slicer = Slicer(plan, full, self.model, index)
        self.optimizer = make_optimizer(self.model.parameters())
        self.param_names = {p: n for n, p in self.model.named_parameters()}
        self.grad_sync: Callable[[nn.Module], None] | None = None  # data-parallel replicas
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.ds_engine = None          # a DeepSpeedEngine over self.model (loft_ext.parallel.ds)
        self.clip_norm = 0.0           # per-worker gradient clipping under DeepSpeed (--ds_clip separate)
        self.after_load: Callable[[], None] | None = None  # e.g. push values into DeepSpeed's master copy
        self.memory_format = torch.contiguous_format  # of the input batches (channels_last: --channels_last)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn=nn.functional.cross_entropy) -> float:
        x = x.contiguous(memory_format=self.memory_format)
        if self.ds_engine is not None:
            return self._deepspeed_step(x, y, loss_fn)
        self.model.train()
        with self.autocast():
            loss = loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.model)
        self.optimizer.step()
        return loss.item()

    def _deepspeed_step(self, x, y, loss_fn) -> float:
        """DeepSpeed owns backward (gradient all-reduce over the replicas) and step (zeroes the grads)."""
        self.ds_engine.train()
        with self.autocast():
            loss = loss_fn(self.ds_engine(x), y)
        self.ds_engine.backward(loss)
        if self.clip_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.ds_engine.step()
        return loss.item()


class LoFTEngine:
    """Holds the full model and S simulated workers; runs rounds of load -> local steps -> sync.

    ``optimizer_state``: ``reset`` clears every worker's optimizer state at the start of each round (the
    paper: a new optimizer per round); ``carry`` keeps full-size copies of the state tensors (e.g. SGD
    momentum) that are sliced and written back exactly like the weights.
    """

    def __init__(self, model: nn.Module, plan: PartitionPlan, make_optimizer, seed: int = 0,
                 optimizer_state: str = "reset", grid: FilterGrid | None = None, comm: Comm | None = None,
                 strategy: str = "allgather", start_round: int = 0):
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"sync strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.full = model
        self.plan = plan
        self.seed = seed
        self.optimizer_state = optimizer_state
        self.grid = grid
        self.comm = comm or Comm(grid.nodes if grid is not None else None)
        local = range(plan.workers) if grid is None else [grid.filter_index]
        self.workers = [Worker(s, model, plan, make_optimizer) for s in local]
        self.partition: Partition | None = None
        self.full_opt_state: dict[str, dict[str, torch.Tensor]] = {}
        self.strategy = None
        if grid is not None:
            if grid.replicas > 1:
                self.workers[0].grad_sync = self._average_gradients
            self.strategy = (AllGatherSync(self) if strategy == "allgather"
                             else AllToAllSync(self, start_round))

    def draw(self, round_index: int) -> Partition:
        return draw_partition(self.plan, self.seed, round_index)

    # ---------------------------------------------------------------------------- round
    def begin_round(self, round_index: int, lr: float | None = None) -> Partition:
        """Draw the round's partition and load every local worker's slices, optimizer state and lr."""
        self.partition = self.draw(round_index)
        if self.strategy is not None:
            self.strategy.load(self.partition)
        for w in self.workers:
            if self.strategy is None:
                w.slicer.load(self.partition)
                self.load_optimizer_state(w)
            if w.after_load is not None:
                w.after_load()
            if lr is not None:
                for group in w.optimizer.param_groups:
                    group["lr"] = lr
        return self.partition

    @torch.no_grad()
    def sync(self) -> None:
        """Write split slices back (disjoint copies) and average everything every worker holds."""
        assert self.partition is not None, "sync() before begin_round()"
        if self.strategy is not None:
            with self.comm.phase("sync"):
                self.strategy.sync(self.partition, self.draw(self.partition.round_index + 1))
            return
        for w in self.workers:
            w.slicer.write_back(self.partition)
        tensors = self.workers[0].slicer.full_tensors
        for name in self.workers[0].slicer.shared_names:
            copies = [w.slicer.sub_tensors[name] for w in self.workers]
            tensors[name].copy_(_mean(copies))
        if self.optimizer_state == "carry":
            self._write_back_optimizer_state()

    def assembled(self) -> nn.Module:
        """The full model with this round's values (gathered first under ``alltoall``); call
        :meth:`release` when done with it."""
        return self.full if self.strategy is None else self.strategy.assemble()

    def release(self) -> None:
        if self.strategy is not None:
            self.strategy.release()

    @torch.no_grad()
    def _average_gradients(self, model: nn.Module) -> None:
        """Mean of the gradients over the D replicas of this worker (one flat all-reduce per step)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self.comm.phase("dp_grad"):
            self.comm.all_reduce(flat, group=self.grid.data_group)
        flat.div_(self.grid.replicas)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---------------------------------------------------------------------------- optimizer state
    def load_optimizer_state(self, w: Worker) -> None:
        if self.optimizer_state == "reset" or not self.full_opt_state:
            w.optimizer.state.clear()
            return
        for p, name in w.param_names.items():
            full_state = self.full_opt_state.get(name)
            if full_state is None:
                continue
            idx = w.slicer.indices(self.partition, name) if name in self.plan.tensor_dims else []
            state = w.optimizer.state[p]
            full_shape = w.slicer.full_tensors[name].shape
            for key, value in full_state.items():
                per_entry = value.dim() > 0 and value.shape == full_shape
                state[key] = read_slice(value, idx).clone() if per_entry else value.clone()

    def _write_back_optimizer_state(self) -> None:
        names = {n for w in self.workers for p, n in w.param_names.items() if w.optimizer.state.get(p)}
        for name in names:
            full_param = self.workers[0].slicer.full_tensors[name]
            states = [w.optimizer.state.get(_param(w, name), {}) for w in self.workers]
            dest = self.full_opt_state.setdefault(name, {})
            for key, value in states[0].items():
                if not torch.is_tensor(value) or any(key not in st for st in states):
                    continue  # a worker whose copy got no gradient this round keeps no state
                sub_param = _param(self.workers[0], name)
                if value.shape == sub_param.shape and value.dim() > 0:
                    if key not in dest:
                        dest[key] = torch.zeros_like(full_param)
                    if name in self.plan.tensor_dims:
                        for w, st in zip(self.workers, states):
                            write_slice(dest[key], st[key], w.slicer.indices(self.partition, name))
                    else:
                        dest[key].copy_(_mean([st[key] for st in states]))
                else:
                    dest[key] = value.clone()  # e.g. Adam's step count: equal on every worker


def _param(w: Worker, name: str) -> nn.Parameter:
    return w.slicer.sub_tensors[name]


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Mean in worker order (sum, then divide): the order a ring all-reduce of S=2 reproduces."""
    if not tensors[0].is_floating_point():
        return tensors[0]  # integer counters (BN num_batches_tracked) are equal on every worker
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors)) if len(tensors) > 1 else total
