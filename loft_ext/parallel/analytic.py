"""Analytic communication of LoFT, computed from the plan and the partitions alone.

This is the count the measured one (:class:`loft_ext.parallel.comm.Comm`) must equal; it is written
independently of the code that packs the buffers. Per rank and per round, for S workers, D replicas,
world W = S*D, b bytes per element:

- shared (both strategies): all-reduce of every shared floating tensor over the grid:
  2 (W-1)/W * b * |shared|; with D > 1 replicas the shared parameters (equal on a worker's replicas)
  over the filter group instead, 2 (S-1)/S * b * |shared params|, the buffers over the grid;
- allgather: one all_gather of the split slices, padded to the largest worker:
  (S-1) * b * max_s |split_s|  (= (S-1)/S * b * |split| for even splits);
- alltoall: rank s sends, of every split tensor, the rows (first split dim) it owns now that rank t
  owns next round: sum_t!=s |own_r(s) & own_{r+1}(t)| rows; in expectation (S-1)/S^2 * b * |split|;
- replicas (D > 1): split BN statistics all-reduced over the data group per round,
  2 (D-1)/D * b * |split buffers_s|, and gradients every step, 2 (D-1)/D * b * |params_s|.

With ``optimizer_state=carry`` every per-entry state tensor (SGD momentum: one per parameter) counts
like its parameter.

Intra-node / inter-node (:func:`rank_bytes`), with the convention of :mod:`loft_ext.parallel.comm`:
all-reduce and all-gather are rings over the group's ranks in rank order (a rank's sent bytes are
inter-node when its successor is on another node, its received bytes when its predecessor is);
all-to-all is direct (the bytes for a peer on another node are inter-node).
"""
from __future__ import annotations

import math

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


def shared_split_bytes(model, plan, world: int, replicas: int, elem: int, state_copies: int = 0) -> tuple[float, float]:
    """(bytes over the filter group, bytes over the grid) one rank sends per round averaging shared tensors.
    D = 1: everything in one all-reduce over the grid. D > 1: parameters (and their per-entry state), equal
    on a worker's replicas, over the S filter ranks; floating buffers over the grid."""
    if replicas == 1:
        return 0.0, shared_allreduce_bytes(model, plan, world, elem, state_copies)
    S = world // replicas
    params = sum(p.numel() * (1 + state_copies) for n, p in model.named_parameters() if n not in plan.tensor_dims)
    bufs = sum(b.numel() for n, b in model.named_buffers() if b.is_floating_point() and n not in plan.tensor_dims)
    return 2 * (S - 1) / S * elem * params if S > 1 else 0.0, 2 * (world - 1) / world * elem * bufs


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
    sent, received = alltoall_peer_bytes(model, plan, part, next_part, worker, elem, state_copies)
    shared = shared_allreduce_bytes(model, plan, world, elem, state_copies)
    return sum(sent) + shared, sum(received) + shared


def alltoall_peer_bytes(model, plan, part: Partition, next_part: Partition, worker: int, elem: int,
                        state_copies: int = 0, include_self: bool = False) -> tuple[list[float], list[float]]:
    """Split-tensor bytes ``worker`` sends to / receives from each worker t (0 for itself unless
    ``include_self``: the rows it keeps) in the all_to_all that ends round ``part``."""
    sent, received = [0.0] * plan.workers, [0.0] * plan.workers
    for name, n, copies in _float_tensors(model, state_copies):
        entries = plan.tensor_dims.get(name)
        if not entries:
            continue
        _, gi = entries[0]
        g = plan.split[gi]
        per_unit = n // g.units  # whole rows of the first split dim
        now, nxt = part.units[gi], next_part.units[gi]
        for t in range(plan.workers):
            if t == worker and not include_self:
                continue
            sent[t] += int(torch.isin(now[worker], nxt[t]).sum()) * per_unit * copies * elem
            received[t] += int(torch.isin(now[t], nxt[worker]).sum()) * per_unit * copies * elem
    return sent, received


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


def _worker_shape(plan: PartitionPlan, name: str, shape: tuple[int, ...], worker: int) -> tuple[int, ...]:
    shape = list(shape)
    for dim, gi in plan.tensor_dims.get(name, ()):
        g = plan.split[gi]
        shape[dim] = shape[dim] // g.units * units_per_worker(g.units, plan.workers)[worker]
    return tuple(shape)


def _shard_numel(shape: tuple[int, ...], replicas: int, d: int) -> int:
    """Entries of shard d (the d-th of ``replicas`` dim-0 chunks, cut as torch.chunk does)."""
    if not shape:
        return 1 if d == 0 else 0
    c = -(-shape[0] // replicas)
    return max(0, min(c, shape[0] - d * c)) * (math.prod(shape) // shape[0] if shape[0] else 0)


def sharded_allgather_round_bytes(model, plan, world: int, replicas: int, elem: int,
                                  state_copies: int = 0) -> dict[str, float]:
    """Bytes one rank sends per round under ``allgather`` with FSDP-sharded replicas
    (:mod:`loft_ext.parallel.shard_sync`): ``filter_gather`` (its shard of the split slices, all-gathered
    over the filter group, padded to the largest shard of any worker), ``shared_params`` (its shard of the
    shared parameters all-reduced over the filter group), ``shared_buffers`` (shared floating buffers
    all-reduced over the grid) and ``shard_gather`` (the D shards put together over the data group). With
    ``state_copies`` every parameter's per-entry state is sharded and moved like the parameter."""
    S, D = plan.workers, replicas
    tensors = [(n, tuple(t.shape), isinstance(t, nn.Parameter)) for n, t in
               list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()]
    tensors += [(n, shape, True) for n, shape, is_param in tensors if is_param] * state_copies
    split = [(n, shape) for n, shape, _ in tensors if n in plan.tensor_dims]
    longest = max(sum(_shard_numel(_worker_shape(plan, n, shape, t), D, e) for n, shape in split)
                  for t in range(S) for e in range(D))
    params = [shape for n, shape, is_param in tensors if is_param and n not in plan.tensor_dims]
    shared_longest = max(sum(_shard_numel(shape, D, e) for shape in params) for e in range(D))
    buffers = sum(math.prod(shape) for n, shape, is_param in tensors if not is_param and n not in plan.tensor_dims)
    return {"filter_gather": float((S - 1) * elem * longest),
            "shared_params": 2 * (S - 1) / S * elem * shared_longest if S > 1 else 0.0,
            "shared_buffers": 2 * (world - 1) / world * elem * buffers if world > 1 else 0.0,
            "shard_gather": float((D - 1) * elem * (S * longest + shared_longest))}


def ring_crossing(ranks: list[int], rank: int, nodes: list[int]) -> tuple[bool, bool]:
    """(successor on another node, predecessor on another node) of ``rank`` in the ring of ``ranks``."""
    ranks = sorted(ranks)
    i = ranks.index(rank)
    return nodes[ranks[(i + 1) % len(ranks)]] != nodes[rank], nodes[ranks[i - 1]] != nodes[rank]


class _Tally:
    def __init__(self):
        self.sent = self.received = self.inter_sent = self.inter_received = 0.0

    def ring(self, moved: float, ranks: list[int], rank: int, nodes: list[int]) -> None:
        out, into = ring_crossing(ranks, rank, nodes)
        self.sent += moved
        self.received += moved
        self.inter_sent += moved if out else 0.0
        self.inter_received += moved if into else 0.0

    def to_dict(self) -> dict:
        return {"bytes_sent": self.sent, "bytes_received": self.received,
                "inter_node_bytes_sent": self.inter_sent, "inter_node_bytes_received": self.inter_received}


def rank_bytes(model, plan, layout, rank: int, strategy: str, rounds: int, steps: int, elem: int,
               state_copies: int = 0, draw=None, expected: bool = False, sharded: bool = False) -> dict:
    """Analytic bytes of one rank of a grid ``layout`` (:class:`loft_ext.parallel.grid.Layout`) over
    ``rounds`` rounds and ``steps`` local steps, split into intra-node and inter-node: ``{"sync": ...,
    "dp_grad": ...}``, each with bytes_sent/received and inter_node_bytes_sent/received.

    ``alltoall`` needs ``draw(r)`` (the partition of round r) for the exact count, or ``expected`` for
    the expectation over random partitions (even splits). ``sharded``: FSDP-sharded replicas (adds
    ``"shard_gather"``): under ``allgather`` :func:`sharded_allgather_round_bytes`; under ``alltoall``
    replica d sends chunk d (ceil(n / D) entries) of each peer's part, the D chunks are all-gathered over
    the data group, and the shared parameters go the same way (a flat chunk of ceil(|shared| / D))."""
    worker, replica = layout.coords[rank]
    world, nodes = len(layout.coords), layout.nodes
    everyone, filter_ranks, data_ranks = list(range(world)), layout.filter_ranks(replica), layout.data_ranks(worker)
    sync, grad, shard = _Tally(), _Tally(), _Tally()
    shared_filter, shared = shared_split_bytes(model, plan, world, layout.replicas, elem, state_copies)
    sharded = sharded and layout.replicas > 1
    if sharded and strategy == "alltoall":
        if expected:
            raise ValueError("the sharded alltoall count is exact only: pass draw, not expected")
        D = layout.replicas
        for k in range(rounds):  # chunk d of every peer's part, then the D chunks gathered over the data group
            sent, received = alltoall_peer_bytes(model, plan, draw(k), draw(k + 1), worker, elem, state_copies,
                                                 include_self=True)
            for t, r in enumerate(filter_ranks):
                far = nodes[r] != nodes[rank]
                out, into = -(-int(sent[t] // elem) // D) * elem, -(-int(received[t] // elem) // D) * elem
                shard.ring((D - 1) * into, data_ranks, rank, nodes)
                if t != worker:
                    sync.sent += out
                    sync.received += into
                    sync.inter_sent += out if far else 0.0
                    sync.inter_received += into if far else 0.0
        params = sum(p.numel() for n, p in model.named_parameters() if n not in plan.tensor_dims)
        chunk = -(-params * (1 + state_copies) // D) * elem
        shared_filter = 2 * (plan.workers - 1) / plan.workers * chunk if plan.workers > 1 else 0.0
        shard.ring((D - 1) * chunk * rounds, data_ranks, rank, nodes)
    elif sharded:
        parts = sharded_allgather_round_bytes(model, plan, world, layout.replicas, elem, state_copies)
        sync.ring(parts["filter_gather"] * rounds, filter_ranks, rank, nodes)
        shared_filter, shared = parts["shared_params"], parts["shared_buffers"]
        shard.ring(parts["shard_gather"] * rounds, data_ranks, rank, nodes)
    elif strategy == "allgather":
        gather = (allgather_round_bytes(model, plan, world, elem, state_copies)
                  - shared_allreduce_bytes(model, plan, world, elem, state_copies))
        sync.ring(gather * rounds, filter_ranks, rank, nodes)
    elif expected:
        S = plan.workers
        split = sum(n * c for name, n, c in _float_tensors(model, state_copies) if name in plan.tensor_dims)
        per_peer = elem * split / S ** 2 * rounds  # expected bytes to each other worker
        for t, r in enumerate(filter_ranks):
            if t != worker:
                far = nodes[r] != nodes[rank]
                sync.sent += per_peer
                sync.received += per_peer
                sync.inter_sent += per_peer if far else 0.0
                sync.inter_received += per_peer if far else 0.0
    else:
        for k in range(rounds):
            sent, received = alltoall_peer_bytes(model, plan, draw(k), draw(k + 1), worker, elem, state_copies)
            for t, r in enumerate(filter_ranks):
                far = nodes[r] != nodes[rank]
                sync.sent += sent[t]
                sync.received += received[t]
                sync.inter_sent += sent[t] if far else 0.0
                sync.inter_received += received[t] if far else 0.0
    sync.ring(shared_filter * rounds, filter_ranks, rank, nodes)
    sync.ring(shared * rounds, everyone, rank, nodes)
    if layout.replicas > 1:
        sync.ring(replica_round_bytes(model, plan, worker, layout.replicas, elem) * rounds, data_ranks, rank, nodes)
        grad.ring(dp_grad_step_bytes(model, plan, worker, layout.replicas, elem) * steps, data_ranks, rank, nodes)
    out = {"sync": sync.to_dict(), "dp_grad": grad.to_dict()}
    return {**out, "shard_gather": shard.to_dict()} if sharded else out


def fsdp_step_bytes(subnet: nn.Module, units: list[nn.Module], replicas: int, param_elem: int,
                    reduce_elem: int, fp32_groups: list[nn.Module] = (), state_copies: int = 0) -> dict:
    """Bytes one rank sends in FSDP2's own collectives (``--replicas fsdp``; not counted by ``Comm``),
    from the worker's sub-network and the blocks sharded one by one (``units``; the rest is the root).

    FSDP2 pads dim 0 of every parameter to a multiple of D, so a rank's shard of a (n0, ...) tensor has
    ceil(n0 / D) * (numel / n0) entries; a ring all-gather or reduce-scatter of a shard sends (D-1)
    shards. Per step: every group's parameters all-gathered for forward, the blocks' again for backward
    (they are resharded after forward; the root is not), every gradient reduce-scattered. Per round: the
    full parameters all-gathered once (``DTensor.full_tensor``, fp32) before the sync, and with
    ``state_copies`` their per-entry optimizer state as well. ``fp32_groups``:
    modules sharded as groups of their own that keep fp32 parameters under a bf16 policy (BatchNorms,
    :func:`loft_ext.parallel.sharded.keeps_fp32`): all-gathered in fp32 for forward and again for backward."""
    if replicas == 1:
        return {"step_bytes_sent": 0.0, "round_bytes_sent": 0.0}

    def shard(p):
        return -(-p.shape[0] // replicas) * (p.numel() // p.shape[0]) if p.dim() and p.shape[0] else p.numel()
    in_units = {id(p) for u in units for p in u.parameters()}
    own_group = {id(p) for m in fp32_groups for p in m.parameters(recurse=False)}
    params = list(subnet.parameters())
    unit_shards = sum(shard(p) for p in params if id(p) in in_units and id(p) not in own_group)
    all_shards = sum(shard(p) for p in params)
    fp32_shards = sum(shard(p) for p in params if id(p) in own_group)
    # forward: everything; backward: the blocks again, and the fp32 groups (never the root) again
    gathers = (all_shards - fp32_shards + unit_shards) * param_elem + 2 * fp32_shards * reduce_elem
    step = (replicas - 1) * (gathers + all_shards * reduce_elem)
    full_elem = params[0].element_size() if params else 4
    return {"step_bytes_sent": float(step),
            "round_bytes_sent": float((replicas - 1) * all_shards * full_elem * (1 + state_copies))}
