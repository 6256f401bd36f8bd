"""The LoFT engine: the full model, the workers' sub-networks, and one round's load / train / sync.

This module simulates all S workers in one process. The distributed runtime keeps the same worker
objects (one per process) and swaps :meth:`LoFTEngine.sync` for collectives.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..partition.plan import PartitionPlan
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn=nn.functional.cross_entropy) -> float:
        self.model.train()
        loss = loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class LoFTEngine:
    """Holds the full model and S simulated workers; runs rounds of load -> local steps -> sync.

    ``optimizer_state``: ``reset`` clears every worker's optimizer state at the start of each round (the
    paper: a new optimizer per round); ``carry`` keeps full-size copies of the state tensors (e.g. SGD
    momentum) that are sliced and written back exactly like the weights.
    """

    def __init__(self, model: nn.Module, plan: PartitionPlan, make_optimizer, seed: int = 0,
                 optimizer_state: str = "reset"):
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}")
        self.full = model
        self.plan = plan
        self.seed = seed
        self.optimizer_state = optimizer_state
        self.workers = [Worker(s, model, plan, make_optimizer) for s in range(plan.workers)]
        self.partition: Partition | None = None
        self.full_opt_state: dict[str, dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------- round
    def begin_round(self, round_index: int, lr: float | None = None) -> Partition:
        """Draw the round's partition and load every worker's slices, optimizer state and lr."""
        self.partition = draw_partition(self.plan, self.seed, round_index)
        for w in self.workers:
            w.slicer.load(self.partition)
            self._load_optimizer_state(w)
            if lr is not None:
                for group in w.optimizer.param_groups:
                    group["lr"] = lr
        return self.partition

    @torch.no_grad()
    def sync(self) -> None:
        """Write split slices back (disjoint copies) and average everything every worker holds."""
        assert self.partition is not None, "sync() before begin_round()"
        for w in self.workers:
            w.slicer.write_back(self.partition)
        tensors = self.workers[0].slicer.full_tensors
        for name in self.workers[0].slicer.shared_names:
            copies = [w.slicer.sub_tensors[name] for w in self.workers]
            tensors[name].copy_(_mean(copies))
        if self.optimizer_state == "carry":
            self._write_back_optimizer_state()

    # ---------------------------------------------------------------------------- optimizer state
    def _load_optimizer_state(self, w: Worker) -> None:
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
