"""Analytic communication of LoFT, computed from the plan and the partitions alone.

This is the count the measured one (:class:`loft_ext.parallel.comm.Comm`) must equal; it is written
independently of the code that packs the buffers. Per rank and per round, for S workers, D replicas,
world W = S*D, b bytes per element:

- shared (both strategies): all-reduce of every shared floating tensor over the grid:
  2 (W-1)/W * b * |shared|;
- allgather: one all_gather of the split slices, padded to the largest worker:
  (S-1) * b * max_s |split_s|  (= (S-1)/S * b * |split| for even splits);
- alltoall: rank s sends, of every split tensor, the rows (first split dim) it owns now that rank t
  owns next round: sum_t!=s |own_r(s) & own_{r+1}(t)| rows; in expectation (S-1)/S^2 * b * |split|;
- replicas (D > 1): split BN statistics all-reduced over the data group per round,
  2 (D-1)/D * b * |split buffers_s|, and gradients every step, 2 (D-1)/D * b * |params_s|.

With ``optimizer_state=carry`` every per-entry state tensor (SGD momentum: one per parameter) counts
like its parameter.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..partition.plan import PartitionPlan, units_per_worker
from ..partition.subnet import Partition


def _float_tensors(model: nn.Module, state_copies: int):
    """(name, numel, copies): buffers once, parameters once plus their per-entry state copies."""
    for name, p in model.named_parameters():
        yield name, p.numel(), 1 + state_copies
    for name, b in model.named_buffers():
        if b.is_floating_point():
            yield name, b.numel(), 1


def _share(plan: PartitionPlan, name: str, numel: int, worker: int) -> int:
    for _, gi in plan.tensor_dims.get(name, ()):
        g = plan.split[gi]
        numel = numel // g.units * units_per_worker(g.units, plan.workers)[worker]
    return numel


def shared_allreduce_bytes(model, plan, world: int, elem: int, state_copies: int = 0) -> float:
    shared = sum(n * c for name, n, c in _float_tensors(model, state_copies) if name not in plan.tensor_dims)
    return 2 * (world - 1) / world * elem * shared if world > 1 else 0.0


def allgather_round_bytes(model, plan, world: int, elem: int, state_copies: int = 0) -> float:
    """Bytes one rank sends (= receives) in the sync of one round under ``allgather``."""
    S = plan.workers
    split = [sum(_share(plan, name, n, s) * c for name, n, c in _float_tensors(model, state_copies)
                 if name in plan.tensor_dims) for s in range(S)]
    gather = (S - 1) * elem * max(split) if S > 1 else 0.0
    return gather + shared_allreduce_bytes(model, plan, world, elem, state_copies)


def alltoall_round_bytes(model, plan, part: Partition, next_part: Partition, worker: int, world: int,
                         elem: int, state_copies: int = 0) -> tuple[float, float]:
    """(sent, received) bytes of ``worker`` in the sync that ends round ``part``, under ``alltoall``."""
    sent = received = 0.0
    for name, n, copies in _float_tensors(model, state_copies):
        entries = plan.tensor_dims.get(name)
        if not entries:
            continue
        _, gi = entries[0]
        g = plan.split[gi]
        per_unit = n // g.units  # whole rows of the first split dim
        now, nxt = part.units[gi], next_part.units[gi]
        for t in range(plan.workers):
            if t == worker:
                continue
            sent += int(torch.isin(now[worker], nxt[t]).sum()) * per_unit * copies * elem
            received += int(torch.isin(now[t], nxt[worker]).sum()) * per_unit * copies * elem
    shared = shared_allreduce_bytes(model, plan, world, elem, state_copies)
    return sent + shared, received + shared


def alltoall_expected_round_bytes(model, plan, world: int, elem: int, state_copies: int = 0) -> float:
    """Expectation over random partitions (even splits): (S-1)/S^2 of the split tensors plus shared."""
    S = plan.workers
    split = sum(n * c for name, n, c in _float_tensors(model, state_copies) if name in plan.tensor_dims)
    return (S - 1) / S ** 2 * elem * split + shared_allreduce_bytes(model, plan, world, elem, state_copies)


def replica_round_bytes(model, plan, worker: int, replicas: int, elem: int) -> float:
    """Split BN statistics averaged over the data group once per round (D > 1)."""
    if replicas == 1:
        return 0.0
    bufs = sum(_share(plan, name, b.numel(), worker) for name, b in model.named_buffers()
               if b.is_floating_point() and name in plan.tensor_dims)
    return 2 * (replicas - 1) / replicas * elem * bufs


def dp_grad_step_bytes(model, plan, worker: int, replicas: int, elem: int) -> float:
    """Gradient all-reduce over the data group per local step (D > 1)."""
    if replicas == 1:
        return 0.0
    params = sum(_share(plan, name, p.numel(), worker) for name, p in model.named_parameters())
    return 2 * (replicas - 1) / replicas * elem * params
