"""Sync strategies of distributed LoFT: one local worker per rank, values moved by peer collectives.

Both strategies produce the same values as the in-process simulation; only the routes differ.

- ``allgather``: every rank keeps the full model. At the end of a round the workers' split slices are
  all-gathered over the filter group (one padded buffer) and every rank writes every worker's slices
  into its own full model.
- ``alltoall``: no rank keeps a full model. Every rank stores, for each split tensor, the *slab* of
  entries whose first split dim belongs to it this round (whole rows: for a tensor split on two dims,
  such as a Bottleneck's 3x3 conv, the cross blocks nobody trains are stored by the row owner). The next
  round's partition is known from the seed, so at the end of a round each rank sends every other rank
  exactly the slab rows that rank owns next round, in one all_to_all over the filter group. The full
  model is assembled only on demand (one all_gather of slabs, counted as ``assemble``).

Shared tensors (weights every worker holds, BN statistics of shared channels) are all-reduced (mean)
over the whole grid. With D > 1 replicas, statistics of split channels are first averaged over the data
group. With ``optimizer_state=carry`` the optimizer's per-entry state travels with its parameter.

``local`` is the in-process simulation of all S workers (no process grid). Every strategy owns the
optimizer state kept across rounds (``opt_state``: full-size tensors per parameter name and state key)
and saves / restores it with ``state_dict`` / ``load_state_dict``; it gets the workers (sub-network,
slicer, optimizer) and the full model from its caller, never the caller itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..partition.subnet import Partition, read_slice, slice_indices, write_slice

STRATEGIES = ("allgather", "alltoall")
OPTIMIZER_STATE_MODES = ("reset", "carry")


def load_optimizer_slices(w, part: Partition, plan, opt_state: dict, mode: str) -> None:
    """Worker ``w``'s optimizer state for round ``part``: cleared under ``reset`` (or before any state
    exists), else every per-entry state tensor sliced from its full-size copy like the weights."""
    if w.optimizer is None:
        return
    if mode == "reset" or not opt_state:
        w.optimizer.state.clear()
        return
    for name in w.param_names.values():
        full_state = opt_state.get(name)
        if full_state is None:
            continue
        idx = w.slicer.indices(part, name) if name in plan.tensor_dims else []
        state = w.state_of(name)  # under FSDP a mirror the replica pushes into its shards after the load
        full_shape = w.slicer.full_tensors[name].shape
        for key, value in full_state.items():
            per_entry = value.dim() > 0 and value.shape == full_shape
            state[key] = read_slice(value, idx).clone() if per_entry else value.clone()


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Mean in worker order (sum, then divide): the order a ring all-reduce of S=2 reproduces."""
    if not tensors[0].is_floating_point():
        return tensors[0]  # integer counters (BN num_batches_tracked) are equal on every worker
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors)) if len(tensors) > 1 else total


def _opt_tensors(opt_state: dict) -> dict[str, torch.Tensor]:
    return {f"opt|{name}|{key}": v.detach().contiguous().cpu() for name, state in opt_state.items()
            for key, v in state.items() if torch.is_tensor(v)}


class _OptStateOwner:
    """The optimizer state a strategy carries across rounds, saved and restored as flat tensors."""

    opt_state: dict[str, dict[str, torch.Tensor]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _opt_tensors(self.opt_state)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device=None) -> None:
        for key, value in tensors.items():
            kind, name, state_key = key.split("|")
            if kind == "opt":
                self.opt_state.setdefault(name, {})[state_key] = value.to(device)


class LocalSync(_OptStateOwner):
    """All S workers in one process: write-back by disjoint copies, shared tensors by in-order means."""

    def __init__(self, workers, plan, optimizer_state: str):
        self.workers, self.plan, self.optimizer_state = workers, plan, optimizer_state
        self.opt_state: dict[str, dict[str, torch.Tensor]] = {}

    def load(self, part: Partition) -> None:
        for w in self.workers:
            w.slicer.load(part)
            load_optimizer_slices(w, part, self.plan, self.opt_state, self.optimizer_state)

    @torch.no_grad()
    def sync(self, part: Partition, next_part: Partition) -> None:
        for w in self.workers:
            w.slicer.write_back(part)
        tensors = self.workers[0].slicer.full_tensors
        for name in self.workers[0].slicer.shared_names:
            tensors[name].copy_(_mean([w.slicer.sub_tensors[name] for w in self.workers]))
        if self.optimizer_state == "carry":
            self._write_back_optimizer_state(part)

    def _write_back_optimizer_state(self, part: Partition) -> None:
        def param(w, name):
            return w.slicer.sub_tensors[name]
        names = {n for w in self.workers if w.optimizer is not None
                 for p, n in w.param_names.items() if w.optimizer.state.get(p)}
        for name in names:
            full_param = self.workers[0].slicer.full_tensors[name]
            states = [w.optimizer.state.get(param(w, name), {}) for w in self.workers]
            dest = self.opt_state.setdefault(name, {})
            for key, value in states[0].items():
                if not torch.is_tensor(value) or any(key not in st for st in states):
                    continue  # a worker whose copy got no gradient this round keeps no state
                if value.shape == param(self.workers[0], name).shape and value.dim() > 0:
                    if key not in dest:
                        dest[key] = torch.zeros_like(full_param)
                    if name in self.plan.tensor_dims:
                        for w, st in zip(self.workers, states):
                            write_slice(dest[key], st[key], w.slicer.indices(part, name))
                    else:
                        dest[key].copy_(_mean([st[key] for st in states]))
                else:
                    dest[key] = value.clone()  # e.g. Adam's step count: equal on every worker

    def assemble(self) -> nn.Module:
        return self.workers[0].slicer.full

    def release(self) -> None:
        pass



def _pack(tensors: list[torch.Tensor], length: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors flattened into one 1-D tensor (into ``out`` when given), zero-padded to ``length``."""
    n = sum(t.numel() for t in tensors)
    length = max(n, length or 0)
    if out is None:
        out = tensors[0].new_empty(length) if tensors else torch.zeros(length)
    out = out[:length]
    if tensors:
        torch.cat([t.reshape(-1) for t in tensors], out=out[:n])
    out[n:].zero_()
    return out


class _Buffers:
    """Flat communication buffers kept from round to round. A fresh multi-MiB CPU tensor per collective
    is first touched (page-faulted) inside the collective or the pack: measured on resnet18 S=2
    under ``allgather``, that doubled the sync's local work. Callers must not keep views of a buffer
    past the sync that filled it."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]


def _unpack(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset:offset + n].view(shape))
        offset += n
    return out


class _Strategy(_OptStateOwner):
    """What both strategies share: the local worker, items to move, shared averaging."""

    def __init__(self, worker, plan, grid, comm, optimizer_state: str, draw):
        self.w, self.plan, self.grid, self.comm = worker, plan, grid, comm
        self.optimizer_state, self.draw = optimizer_state, draw
        self.opt_state: dict[str, dict[str, torch.Tensor]] = {}
        self.full_shapes = {n: tuple(t.shape) for n, t in self.w.slicer.full_tensors.items()}
        self.sub_shapes = {n: tuple(t.shape) for n, t in self.w.slicer.sub_tensors.items()}
        self.units = [self.plan.units_of(t) for t in range(self.plan.workers)]  # fixed for the whole run
        self.buffers = _Buffers()
        dtypes = {t.dtype for t in self.w.slicer.sub_tensors.values() if t.is_floating_point()}
        if len(dtypes) > 1:
            raise ValueError(f"loft_ext syncs one floating dtype per model; this one mixes {sorted(map(str, dtypes))}:"
                             " keep parameters in fp32 and use autocast for bf16/fp16")

    # items: (tensor name, "" for the tensor itself or an optimizer-state key) ------------------
    def items(self, split: bool, state: bool = True) -> list[tuple[str, str]]:
        names = self.w.slicer.split_names if split else self.w.slicer.shared_names
        out = []
        for name in names:
            t = self.w.slicer.sub_tensors[name]
            if not t.is_floating_point():
                continue
            out.append((name, ""))
            if state and self.optimizer_state == "carry" and isinstance(t, nn.Parameter) and self.w.optimizer:
                for key, v in self.w.live_state(name).items():
                    if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == self.sub_shapes[name]:
                        out.append((name, key))
        return out

    def sub_item(self, name: str, key: str) -> torch.Tensor:
        return self.w.slicer.sub_tensors[name] if not key else self.w.state_of(name)[key]

    def average_split_buffers_over_replicas(self) -> None:
        """D replicas hold identical weights but saw different batches: average their BN statistics."""
        if self.grid.replicas == 1:
            return
        bufs = [self.w.slicer.sub_tensors[n] for n, _ in self.items(split=True, state=False)
                if not isinstance(self.w.slicer.sub_tensors[n], nn.Parameter)]
        if bufs:
            flat = _pack(bufs, out=self.buffers.get("replica_stats", sum(b.numel() for b in bufs), bufs[0]))
            self.comm.all_reduce(flat, group=self.grid.data_group)
            flat.div_(self.grid.replicas)
            for b, v in zip(bufs, _unpack(flat, [tuple(b.shape) for b in bufs])):
                b.copy_(v)

    def average_shared(self, params: bool = True) -> list[tuple[tuple[str, str], torch.Tensor]]:
        """Mean of every shared floating tensor over the grid (only the buffers without ``params``); returns
        the means. With D > 1 replicas, parameters (and their optimizer state) are equal on a worker's D
        replicas, so their mean over the grid is their mean over the filter group: they are all-reduced
        there, and only the buffers (BatchNorm statistics, which the replicas' batches made differ) over the
        whole grid."""
        items = self.items(split=False)
        is_param = [isinstance(self.w.slicer.sub_tensors[name], nn.Parameter) for name, _ in items]
        if self.grid.replicas == 1 and params:
            groups = [(items, None, self.grid.world_size)]
        else:
            groups = [([it for it, p in zip(items, is_param) if not p], None, self.grid.world_size)]
            if params:
                groups.insert(0, ([it for it, p in zip(items, is_param) if p], self.grid.filter_group,
                                  self.grid.workers))
        out = []
        for key, (members, group, n) in enumerate(groups):
            if not members:
                continue
            tensors = [self.sub_item(*it) for it in members]
            flat = _pack(tensors, out=self.buffers.get(f"shared{key}", sum(t.numel() for t in tensors), tensors[0]))
            self.comm.all_reduce(flat, group=group)
            if n > 1:
                flat.div_(n)
            out += zip(members, _unpack(flat, [tuple(t.shape) for t in tensors]))
        return out

    def keep_scalar_state(self) -> None:
        """Optimizer state that is not per entry (Adam's step) is equal on every worker: keep ours."""
        if self.optimizer_state != "carry":
            return
        for name in self.w.param_names.values():
            for key, v in self.w.live_state(name).items():
                if torch.is_tensor(v) and (v.dim() == 0 or tuple(v.shape) != self.sub_shapes[name]):
                    self.opt_state.setdefault(name, {})[key] = v.clone()


class AllGatherSync(_Strategy):
    """Every rank keeps the full model; split slices are all-gathered over the filter group."""

    def load(self, part: Partition) -> None:
        self.w.slicer.load(part)
        load_optimizer_slices(self.w, part, self.plan, self.opt_state, self.optimizer_state)

    def full_item(self, name: str, key: str) -> torch.Tensor:
        if not key:
            return self.w.slicer.full_tensors[name]
        state = self.opt_state.setdefault(name, {})
        if key not in state:  # per-entry state has its parameter's dtype and device
            full = self.w.slicer.full_tensors[name]
            state[key] = torch.zeros(self.full_shapes[name], dtype=full.dtype, device=full.device)
        return state[key]

    @torch.no_grad()
    def sync(self, part: Partition, next_part: Partition) -> None:
        self.average_split_buffers_over_replicas()
        S = self.plan.workers
        items = self.items(split=True)
        shapes = [[self.plan.narrow_shape(n, self.full_shapes[n], self.units[t]) for n, _ in items] for t in range(S)]
        sizes = [sum(math.prod(s) for s in shapes[t]) for t in range(S)]
        longest = max(sizes)
        mine = _pack([self.sub_item(*it) for it in items], longest,
                     out=self.buffers.get("send", longest, self.sub_item(*items[0])))
        gathered = self.buffers.get("gathered", S * longest, mine)
        self.comm.all_gather(gathered, mine, group=self.grid.filter_group)
        for t in range(S):
            pieces = _unpack(gathered[t * longest:t * longest + sizes[t]], shapes[t])
            for (name, key), piece in zip(items, pieces):
                idx = slice_indices(self.plan, part, name, self.full_shapes[name], t)
                write_slice(self.full_item(name, key), piece, idx)
        for (name, key), mean in self.average_shared():
            self.full_item(name, key).copy_(mean)
        for name in self.w.slicer.shared_names:  # integer counters: equal everywhere
            full = self.w.slicer.full_tensors[name]
            if not full.is_floating_point():
                full.copy_(self.w.slicer.sub_tensors[name])
        self.keep_scalar_state()

    def assemble(self) -> nn.Module:
        return self.w.slicer.full

    def release(self) -> None:
        pass



class AllToAllSync(_Strategy):
    """No rank keeps a full model: each stores its slabs and sends peers what they own next round."""

    def __init__(self, worker, plan, grid, comm, optimizer_state: str, draw, start_round: int = 0):
        super().__init__(worker, plan, grid, comm, optimizer_state, draw)
        self.owner = draw(start_round)   # the partition the slabs are laid out for
        self.slabs: dict[tuple[str, str], torch.Tensor] = {}
        with torch.no_grad():
            for name in self.w.slicer.split_names:
                full = self.w.slicer.full_tensors[name]
                if full.is_floating_point():
                    self.slabs[(name, "")] = read_slice(full, self._own_idx(self.owner, name)[:1]).clone()
        self.w.slicer.load(self.owner)  # shared tensors live in the sub-network from now on
        self.release()

    def _own_idx(self, part: Partition, name: str, worker: int | None = None):
        worker = self.w.index if worker is None else worker
        return slice_indices(self.plan, part, name, self.full_shapes[name], worker)

    def _slab(self, name: str, key: str) -> torch.Tensor:
        if (name, key) not in self.slabs:  # optimizer state appears after the first step
            shape = list(self.full_shapes[name])
            d0, ix = self._own_idx(self.owner, name)[0]
            shape[d0] = len(ix)
            ref = self.sub_item(name, key)
            self.slabs[(name, key)] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        return self.slabs[(name, key)]

    @torch.no_grad()
    def load(self, part: Partition) -> None:
        assert part.round_index == self.owner.round_index, "alltoall slabs are laid out for another round"
        reset = self.optimizer_state == "reset" or self.w.optimizer is None
        if self.w.optimizer is not None and self.optimizer_state == "reset":
            self.w.optimizer.state.clear()
        for (name, key), slab in self.slabs.items():
            rest = self._own_idx(part, name)[1:]
            if key:
                if not reset:
                    self.w.state_of(name)[key] = read_slice(slab, rest).clone()
            else:
                self.w.slicer.sub_tensors[name].copy_(read_slice(slab, rest))
        if not reset:
            for name in self.w.param_names.values():
                for key, v in self.opt_state.get(name, {}).items():
                    self.w.state_of(name)[key] = v.clone()

    def _rows(self, name: str, units: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
        """Positions along the first split dim, inside a slab laid out for ``among``, of ``units``."""
        (d0, gi), = self.plan.tensor_dims[name][:1]
        k = self.full_shapes[name][d0] // self.plan.split[gi].units
        pos = torch.searchsorted(among, units)
        return (pos[:, None] * k + torch.arange(k)).reshape(-1)

    @torch.no_grad()
    def sync(self, part: Partition, next_part: Partition) -> None:
        self.average_split_buffers_over_replicas()
        items = self.items(split=True)
        for name, key in items:  # the trained block goes back into our slab
            write_slice(self._slab(name, key), self.sub_item(name, key), self._own_idx(part, name)[1:])
        S, me = self.plan.workers, self.w.index
        send, out_counts, recv_layout = [[] for _ in range(S)], [0] * S, []
        for name, key in items:
            d0, gi = self.plan.tensor_dims[name][0]
            now = part.units[gi][me]
            slab = self.slabs[(name, key)]
            for t in range(S):
                rows = self._rows(name, now[torch.isin(now, next_part.units[gi][t])], now)
                send[t].append(slab.index_select(d0, rows))
            nxt = next_part.units[gi][me]
            for t in range(S):
                got = part.units[gi][t][torch.isin(part.units[gi][t], nxt)]
                shape = list(slab.shape)
                shape[d0] = len(self._rows(name, got, nxt))
                recv_layout.append((name, key, t, got, tuple(shape)))
                out_counts[t] += math.prod(shape)
        in_counts = [sum(x.numel() for x in send[t]) for t in range(S)]
        flat_in = _pack([x for t in range(S) for x in send[t]],
                        out=self.buffers.get("send", sum(in_counts), self.sub_item(*items[0])))
        flat_out = self.buffers.get("received", sum(out_counts), flat_in)
        self.exchange(flat_out, flat_in, out_counts, in_counts)
        # received pieces arrive grouped by source rank, in item order within each source
        by_source = {t: [] for t in range(S)}
        for entry in recv_layout:
            by_source[entry[2]].append(entry)
        ordered = [e for t in range(S) for e in by_source[t]]
        pieces = _unpack(flat_out, [e[4] for e in ordered])
        new_slabs = {}
        for (name, key, t, got, shape), piece in zip(ordered, pieces):
            d0, gi = self.plan.tensor_dims[name][0]
            nxt = next_part.units[gi][me]
            if (name, key) not in new_slabs:
                full_shape = list(self.slabs[(name, key)].shape)
                full_shape[d0] = len(self._rows(name, nxt, nxt))
                new_slabs[(name, key)] = piece.new_empty(full_shape)
            new_slabs[(name, key)].index_copy_(d0, self._rows(name, got, nxt), piece)
        self.slabs.update(new_slabs)
        self.owner = next_part
        for (name, key), mean in self.average_shared():
            self.sub_item(name, key).copy_(mean)
            if key:
                self.opt_state.setdefault(name, {})[key] = mean.clone()
        self.keep_scalar_state()

    def exchange(self, flat_out: torch.Tensor, flat_in: torch.Tensor, out_counts: list[int],
                 in_counts: list[int]) -> None:
        """The round's all_to_all over the filter group (entries to / from each worker, in worker order)."""
        self.comm.all_to_all(flat_out, flat_in, out_counts, in_counts, group=self.grid.filter_group)

    @torch.no_grad()
    def assemble(self) -> nn.Module:
        """Gather every rank's slabs into this rank's full model (counted as ``assemble``)."""
        S = self.plan.workers
        names = [n for (n, k) in self.slabs if not k]
        shapes = []
        for t in range(S):
            row = []
            for n in names:
                d0, ix = self._own_idx(self.owner, n, t)[0]
                shape = list(self.full_shapes[n])
                shape[d0] = len(ix)
                row.append(tuple(shape))
            shapes.append(row)
        sizes = [sum(math.prod(s) for s in row) for row in shapes]
        longest = max(sizes)
        mine = _pack([self.slabs[(n, "")] for n in names], longest)
        gathered = mine.new_empty(S * longest)
        with self.comm.phase("assemble"):
            self.comm.all_gather(gathered, mine, group=self.grid.filter_group)
        full = self.w.slicer.full_tensors
        for n in names:
            full[n].data = torch.empty(self.full_shapes[n], dtype=mine.dtype, device=mine.device)
        for t in range(S):
            for n, piece in zip(names, _unpack(gathered[t * longest:t * longest + sizes[t]], shapes[t])):
                d0, ix = self._own_idx(self.owner, n, t)[0]
                full[n].index_copy_(d0, ix, piece)
        for n in self.w.slicer.shared_names:
            full[n].copy_(self.w.slicer.sub_tensors[n])
        for n in self.w.slicer.split_names:  # integer split buffers do not exist in timm CNNs
            assert full[n].numel() > 0, n
        return self.w.slicer.full

    def state_dict(self, weights: bool = False) -> dict[str, torch.Tensor]:
        """Carried optimizer state and this rank's slabs of it; with ``weights`` also the weights' slabs
        (the recipe's checkpoints store the assembled model instead)."""
        out = _opt_tensors(self.opt_state)
        out.update({f"slab|{name}|{key}": v.detach().contiguous().cpu() for (name, key), v in self.slabs.items()
                    if key or weights})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device=None) -> None:
        for key, value in tensors.items():
            kind, name, state_key = key.split("|")
            if kind == "opt":
                self.opt_state.setdefault(name, {})[state_key] = value.to(device)
            elif kind == "slab":
                self.slabs[(name, state_key)] = value.to(device)

    def release(self) -> None:
        """Free the full model's split tensors again (a worker keeps only its sub-network and slabs)."""
        for n in self.w.slicer.split_names:
            t = self.w.slicer.full_tensors[n]
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
