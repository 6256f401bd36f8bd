"""The ``allgather`` sync of FSDP-sharded replicas (``--replicas fsdp``, D > 1): the filter axis moves shards.

Rank (s, d) holds shard d of worker s's sub-network: FSDP2's dim-0 chunk (``torch.chunk`` over D) of
every parameter. Under DDP replicas all D replicas of a worker hold the whole sub-network and each sends
the same whole slices over the filter axis. Here rank (s, d) sends only shard d, to the ranks of the
other workers that hold shard d (its filter group), and the D shards are put together once, inside the
worker's data group:

1. BatchNorm statistics of split channels are averaged over the data group (as under DDP), shared
   BatchNorm statistics over the whole grid (as under DDP; FSDP does not shard buffers);
2. split tensors: shard d of this worker's slices, all-gathered over the filter group (``sync``);
3. shared parameters: shard d, averaged over the filter group (the D replicas of a worker already agree,
   so the mean over S workers is the mean over the grid) (``sync``);
4. one all-gather over the data group of what 2 and 3 produced (``shard_gather``): every rank ends the
   round with the full model, as under DDP, and FSDP's own full-parameter all-gather before the sync
   (``DTensor.full_tensor``) is not needed.

Per rank, the filter-axis bytes are 1/D of the DDP replicas' (up to the padding of shards); the data-axis
gather adds what FSDP's round-end all-gather moved before, for every worker's slices. With replicas
placed within a node, only the filter axis crosses nodes. Shared parameters are a mean of S values here
and of S x D (pairwise equal) values under DDP: the two agree to float rounding, not bit for bit.

With ``optimizer_state=carry`` every per-entry state tensor (SGD momentum, Adam's moments) is sharded like
its parameter (the optimizer is built over the shards) and moves with it in 2-4: this rank's shard of it,
read from the optimizer's DTensor state; every rank ends the round with the full-size carried state (as it
ends with the full model), and the next load hands each shard back (:meth:`ShardedReplica.load_state`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ..partition.subnet import slice_indices, write_slice
from .sharded import shard_of, shard_shape
from .sync import AllGatherSync, AllToAllSync, _pack, _unpack


def join_shards(pieces: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat(pieces, dim=0).view(shape)


class ShardedAllGatherSync(AllGatherSync):
    """``allgather`` where rank (s, d) moves only shard d over the filter axis (module docstring)."""

    def _piece(self, name: str, key: str = "") -> torch.Tensor:
        """This rank's shard of tensor ``name`` (or of its optimizer state ``key``): the trained FSDP local
        shard of a parameter or of its state, the dim-0 chunk of a buffer (equal on the D replicas once
        averaged)."""
        t = self.w.slicer.sub_tensors[name]
        if key:
            value = self.w.live_state(name)[key]
            return (value.to_local() if isinstance(value, DTensor)
                    else shard_of(value, self.grid.replicas, self.grid.data_index)).reshape(-1)
        if isinstance(t, nn.Parameter):
            return self.w.sharded.local_shard(name).reshape(-1)
        return shard_of(t, self.grid.replicas, self.grid.data_index).reshape(-1)

    @torch.no_grad()
    def sync(self, part, next_part) -> None:
        self.w.sharded.gather(params=False)  # the trained BN statistics into the plain sub-network
        self.average_split_buffers_over_replicas()
        S, D, me = self.plan.workers, self.grid.replicas, self.w.index
        sub, full = self.w.slicer.sub_tensors, self.w.slicer.full_tensors
        split = self.items(split=True)  # with carry, every parameter's per-entry state after it
        shapes = [[self.plan.narrow_shape(n, self.full_shapes[n], self.units[t]) for n, _ in split] for t in range(S)]
        pieces = [[[shard_shape(s, D, e) for s in shapes[t]] for e in range(D)] for t in range(S)]
        sizes = [[sum(math.prod(s) for s in pieces[t][e]) for e in range(D)] for t in range(S)]
        longest = max(max(row) for row in sizes)
        ref = sub[split[0][0]]
        mine = _pack([self._piece(*it) for it in split], longest, out=self.buffers.get("send", longest, ref))
        gathered = self.buffers.get("gathered", S * longest, ref)
        self.comm.all_gather(gathered, mine, group=self.grid.filter_group)

        shared = [it for it in self.items(split=False) if isinstance(sub[it[0]], nn.Parameter)]
        shared_pieces = [[shard_shape(self.full_shapes[n], D, e) for n, _ in shared] for e in range(D)]
        shared_sizes = [sum(math.prod(s) for s in row) for row in shared_pieces]
        shared_longest = max(shared_sizes)
        block = S * longest + shared_longest
        send = self.buffers.get("shard_send", block, ref)
        send[:S * longest].copy_(gathered)
        if shared:
            means = _pack([self._piece(*it) for it in shared], shared_longest, out=send[S * longest:])
            self.comm.all_reduce(means, group=self.grid.filter_group)
            if S > 1:
                means.div_(S)
        everything = self.buffers.get("shard_all", D * block, ref)
        with self.comm.phase("shard_gather"):
            self.comm.all_gather(everything, send, group=self.grid.data_group)

        for t in range(S):
            per_shard = [_unpack(everything[e * block + t * longest:e * block + t * longest + sizes[t][e]],
                                 pieces[t][e]) for e in range(D)]
            for i, (name, key) in enumerate(split):
                whole = join_shards([per_shard[e][i] for e in range(D)], shapes[t][i])
                write_slice(self.full_item(name, key), whole,
                            slice_indices(self.plan, part, name, self.full_shapes[name], t))
                if t == me and not key and not isinstance(sub[name], nn.Parameter):  # the plain parameters are released
                    sub[name].copy_(whole)
        start = S * longest
        per_shard = [_unpack(everything[e * block + start:e * block + start + shared_sizes[e]], shared_pieces[e])
                     for e in range(D)]
        for i, (name, key) in enumerate(shared):
            self.full_item(name, key).copy_(join_shards([per_shard[e][i] for e in range(D)], self.full_shapes[name]))
        for (name, _), mean in self.average_shared(params=False):
            full[name].copy_(mean)
            sub[name].copy_(mean)
        for name in self.w.slicer.shared_names:  # integer counters: equal everywhere
            if not full[name].is_floating_point():
                full[name].copy_(sub[name])
        self.keep_scalar_state()


class ShardedAllToAllSync(AllToAllSync):
    """``alltoall`` with FSDP replicas: the D replicas of a worker hold the same slabs and would each send
    the same rows; replica d sends only the d-th chunk of each peer's part of the exchange (to the replica
    d of that peer), and one all-gather over the worker's D ranks (``shard_gather``) rebuilds every part.
    Shared parameters are averaged the same way (chunk d over the filter group, then gathered). The slabs
    are still written from the whole trained sub-network (gathered from the shards with ``full_tensor()``
    before the sync, inside the worker's D ranks); only the filter axis moves 1/D."""

    def exchange(self, flat_out, flat_in, out_counts, in_counts) -> None:
        D, d = self.grid.replicas, self.grid.data_index
        send_chunks = [-(-n // D) for n in in_counts]
        recv_chunks = [-(-n // D) for n in out_counts]
        send = self.buffers.get("shard_send", sum(send_chunks), flat_in)
        send.zero_()
        start = pos = 0
        for n, c in zip(in_counts, send_chunks):
            piece = flat_in[start + min(d * c, n):start + min((d + 1) * c, n)]
            send[pos:pos + piece.numel()].copy_(piece)
            start, pos = start + n, pos + c
        received = self.buffers.get("shard_received", sum(recv_chunks), flat_in)
        self.comm.all_to_all(received, send, recv_chunks, send_chunks, group=self.grid.filter_group)
        everything = self.buffers.get("shard_all", D * received.numel(), flat_in)
        with self.comm.phase("shard_gather"):
            self.comm.all_gather(everything, received, group=self.grid.data_group)
        start = pos = 0
        for n, c in zip(out_counts, recv_chunks):
            whole = torch.cat([everything[e * received.numel() + pos:e * received.numel() + pos + c] for e in range(D)])
            flat_out[start:start + n].copy_(whole[:n])
            start, pos = start + n, pos + c

    def average_shared(self, params: bool = True):
        out = super().average_shared(params=False)
        if not params:
            return out
        items = [it for it in self.items(split=False)
                 if isinstance(self.w.slicer.sub_tensors[it[0]], nn.Parameter)]
        if not items:
            return out
        tensors = [self.sub_item(*it) for it in items]
        D, d, S = self.grid.replicas, self.grid.data_index, self.grid.workers
        total = sum(t.numel() for t in tensors)
        c = -(-total // D)
        flat = _pack(tensors, c * D, out=self.buffers.get("shared_params", c * D, tensors[0]))
        mine = flat[d * c:(d + 1) * c]
        self.comm.all_reduce(mine, group=self.grid.filter_group)
        if S > 1:
            mine.div_(S)
        everything = self.buffers.get("shared_params_all", c * D, tensors[0])
        with self.comm.phase("shard_gather"):
            self.comm.all_gather(everything, mine.clone(), group=self.grid.data_group)
        return out + list(zip(items, _unpack(everything[:total], [tuple(t.shape) for t in tensors])))


__all__ = ["ShardedAllGatherSync", "ShardedAllToAllSync", "join_shards"]
