"""Every collective loft_ext issues goes through :class:`Comm`, which counts bytes and calls per phase.

Byte conventions, per rank, for a group of n ranks (what the collective must move at least; gloo and
NCCL ring/pairwise algorithms move exactly this):

| collective | sent | received |
|---|---|---|
| all_reduce of B bytes | 2 (n-1)/n B | 2 (n-1)/n B |
| all_gather_single (all_gather_into_tensor) of B bytes per rank | (n-1) B | (n-1) B |
| all_to_all_single | bytes of the input splits for the other ranks | bytes of the output splits from the other ranks |

Padding that a collective carries is counted: the count is what is moved, not what is useful.

Intra-node and inter-node bytes (a rank knows the node of every peer, :attr:`Comm.nodes`): the
collectives' algorithms are taken as

- all_reduce and all_gather: a *ring* over the group's ranks in rank order; a rank sends everything
  above to its successor and receives it from its predecessor, so its sent bytes are inter-node when
  its successor is on another node, its received bytes when its predecessor is;
- all_to_all: *direct*: the split for a peer goes to that peer, inter-node when the peer is on another
  node.

This is the convention of gloo's ring all-reduce and of NCCL's ring algorithms; NCCL's tree or NVLS
algorithms move the same bytes by other routes. ``inter_node_bytes_*`` are counted under it and the
analytic count (:mod:`loft_ext.parallel.analytic`) uses the same convention.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

PHASES = ("sync", "shard_gather", "dp_grad", "assemble", "metric", "checkpoint")

# torch 2.14 renamed all_gather_into_tensor (now deprecated, with a warning per call)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Counter:
    sent: float = 0.0
    received: float = 0.0
    calls: int = 0
    inter_sent: float = 0.0      # of ``sent``, bytes to a rank on another node
    inter_received: float = 0.0  # of ``received``, bytes from a rank on another node

    def to_dict(self) -> dict:
        return {"bytes_sent": self.sent, "bytes_received": self.received, "calls": self.calls,
                "inter_node_bytes_sent": self.inter_sent, "inter_node_bytes_received": self.inter_received}

    @classmethod
    def from_dict(cls, d: dict) -> "Counter":
        return cls(d["bytes_sent"], d["bytes_received"], d["calls"], d.get("inter_node_bytes_sent", 0.0),
                   d.get("inter_node_bytes_received", 0.0))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Counting wrapper over torch.distributed collectives; ``phase`` names what the bytes are for."""

    def __init__(self, nodes: list[int] | None = None):
        self.counters: dict[str, Counter] = defaultdict(Counter)
        self._phase = "sync"
        self.nodes = nodes  # node index of every global rank; None: one node

    def _ring(self, group) -> tuple[bool, bool]:
        """(successor on another node, predecessor on another node) in the group's ring."""
        if self.nodes is None:
            return False, False
        ranks = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
        ranks = sorted(ranks)
        i = ranks.index(dist.get_rank())
        me = self.nodes[ranks[i]]
        return self.nodes[ranks[(i + 1) % len(ranks)]] != me, self.nodes[ranks[i - 1]] != me

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown communication phase {name!r}; one of {PHASES}")
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def _count(self, sent: float, received: float, inter_sent: float = 0.0, inter_received: float = 0.0) -> None:
        c = self.counters[self._phase]
        c.sent += sent
        c.received += received
        c.inter_sent += inter_sent
        c.inter_received += inter_received
        c.calls += 1

    def _count_ring(self, moved: float, group) -> None:
        out, into = self._ring(group)
        self._count(moved, moved, moved if out else 0.0, moved if into else 0.0)

    def all_reduce(self, tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> None:
        n = dist.get_world_size(group)
        if n == 1:
            return
        dist.all_reduce(tensor, op=op, group=group)
        self._count_ring(2 * (n - 1) / n * _nbytes(tensor), group)

    def all_reduce_async(self, tensor: torch.Tensor, group=None):
        """An all-reduce (sum) that returns a Future of ``[tensor]`` (DDP communication hooks)."""
        n = dist.get_world_size(group)
        if n == 1:
            fut = torch.futures.Future()
            fut.set_result([tensor])
            return fut
        work = dist.all_reduce(tensor, group=group, async_op=True)
        self._count_ring(2 * (n - 1) / n * _nbytes(tensor), group)
        return work.get_future()

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
        n = dist.get_world_size(group)
        if n == 1:
            output.copy_(tensor)
            return
        _all_gather_single(output, tensor, group=group)
        self._count_ring((n - 1) * _nbytes(tensor), group)

    def all_to_all(self, output: torch.Tensor, tensor: torch.Tensor, out_splits: list[int],
                   in_splits: list[int], group=None) -> None:
        n = dist.get_world_size(group)
        me = dist.get_group_rank(group, dist.get_rank()) if group is not None else dist.get_rank()
        if n == 1:
            output.copy_(tensor)
            return
        dist.all_to_all_single(output, tensor, out_splits, in_splits, group=group)
        size = tensor.element_size()
        sent = sum(k for i, k in enumerate(in_splits) if i != me) * size
        received = sum(k for i, k in enumerate(out_splits) if i != me) * size
        ranks = list(range(n)) if group is None else sorted(dist.get_process_group_ranks(group))
        if self.nodes is None:
            far = [False] * n
        else:
            far = [self.nodes[r] != self.nodes[ranks[me]] for r in ranks]
        inter_sent = sum(k for i, k in enumerate(in_splits) if far[i]) * size
        inter_received = sum(k for i, k in enumerate(out_splits) if far[i]) * size
        self._count(sent, received, inter_sent, inter_received)

    def totals(self) -> dict:
        return {phase: c.to_dict() for phase, c in sorted(self.counters.items())}

    def state_dict(self) -> dict:
        return self.totals()
