"""Every collective loft_ext issues goes through :class:`Comm`, which counts bytes and calls per phase.

Byte conventions, per rank, for a group of n ranks (what the collective must move at least; gloo and
NCCL ring/pairwise algorithms move exactly this):

| collective | sent | received |
|---|---|---|
| all_reduce of B bytes | 2 (n-1)/n B | 2 (n-1)/n B |
| all_gather_single (all_gather_into_tensor) of B bytes per rank | (n-1) B | (n-1) B |
| all_to_all_single | bytes of the input splits for the other ranks | bytes of the output splits from the other ranks |

Padding that a collective carries is counted: the count is what is moved, not what is useful.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

PHASES = ("sync", "dp_grad", "assemble", "metric", "checkpoint")

# torch 2.14 renamed all_gather_into_tensor (now deprecated, with a warning per call)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Counter:
    sent: float = 0.0
    received: float = 0.0
    calls: int = 0

    def to_dict(self) -> dict:
        return {"bytes_sent": self.sent, "bytes_received": self.received, "calls": self.calls}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Counting wrapper over torch.distributed collectives; ``phase`` names what the bytes are for."""

    def __init__(self):
        self.counters: dict[str, Counter] = defaultdict(Counter)
        self._phase = "sync"

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown communication phase {name!r}; one of {PHASES}")
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def _count(self, sent: float, received: float) -> None:
        c = self.counters[self._phase]
        c.sent += sent
        c.received += received
        c.calls += 1

    def all_reduce(self, tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> None:
        n = dist.get_world_size(group)
        if n == 1:
            return
        dist.all_reduce(tensor, op=op, group=group)
        moved = 2 * (n - 1) / n * _nbytes(tensor)
        self._count(moved, moved)

    def all_reduce_async(self, tensor: torch.Tensor, group=None):
        """An all-reduce (sum) that returns a Future of ``[tensor]`` (DDP communication hooks)."""
        n = dist.get_world_size(group)
        if n == 1:
            fut = torch.futures.Future()
            fut.set_result([tensor])
            return fut
        work = dist.all_reduce(tensor, group=group, async_op=True)
        moved = 2 * (n - 1) / n * _nbytes(tensor)
        self._count(moved, moved)
        return work.get_future()

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
        n = dist.get_world_size(group)
        if n == 1:
            output.copy_(tensor)
            return
        _all_gather_single(output, tensor, group=group)
        moved = (n - 1) * _nbytes(tensor)
        self._count(moved, moved)

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
        self._count(sent, received)

    def totals(self) -> dict:
        return {phase: c.to_dict() for phase, c in sorted(self.counters.items())}

    def state_dict(self) -> dict:
        return self.totals()
