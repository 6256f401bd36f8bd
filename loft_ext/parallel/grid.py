"""The LoFT process grid: S filter workers x D data-parallel replicas, laid out over the nodes.

Every rank has grid coordinates (worker s, replica d). The S ranks of one replica form a *filter
group* (together they hold one full model); the D ranks that are the same worker form a *data group*
(they hold identical sub-networks and average gradients every step). Every rank creates every group
in the same order, as torch.distributed requires.

Two layouts (``--grid_order``), both over the ranks in launch order (every launcher numbers the ranks
of one node contiguously):

- ``workers-within-node``: rank r is worker ``r % S`` of replica ``r // S`` (the single-node order);
- ``replicas-within-node``: rank r is worker ``r // D`` of replica ``r % D``: the D replicas of a worker
  sit on consecutive ranks, so they share a node whenever D divides the processes per node, and the
  per-step gradient all-reduce stays on the node's fast links; only the filter axis (bytes once per
  round of L steps) crosses nodes.

``auto`` picks ``workers-within-node`` on one node (nothing crosses nodes) and ``replicas-within-node``
on more. The layout is an execution choice: it never enters the run's hash, and a run may be resumed
under the other layout (checkpoint files are matched by grid coordinates, not by rank).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from loft_ext.errors import ConfigError

GRID_ORDERS = ("auto", "replicas-within-node", "workers-within-node")

# the launcher variables that name a rank's node, first match wins (hostname when none is set):
# torchrun / accelerate launch (GROUP_RANK), the deepspeed launcher (CROSS_RANK), others (NODE_RANK)
NODE_VARIABLES = ("GROUP_RANK", "CROSS_RANK", "NODE_RANK")


class GridError(ConfigError):
    """A world size and worker count that do not form a grid; the message lists sizes that work."""


@dataclass
class Layout:
    """Grid coordinates of every rank, and how the grid's two axes meet the nodes."""

    order: str                      # replicas-within-node or workers-within-node (auto resolved)
    workers: int
    replicas: int
    nodes: list[int]                # node index of every rank (0.. in order of first appearance)
    coords: list[tuple[int, int]]   # (worker, replica) of every rank

    @property
    def num_nodes(self) -> int:
        return len(set(self.nodes))

    def rank_of(self, worker: int, replica: int) -> int:
        return self.coords.index((worker, replica))

    def filter_ranks(self, replica: int) -> list[int]:
        return [self.rank_of(s, replica) for s in range(self.workers)]

    def data_ranks(self, worker: int) -> list[int]:
        return [self.rank_of(worker, d) for d in range(self.replicas)]

    def _spans(self, groups) -> bool:
        return any(len({self.nodes[r] for r in g}) > 1 for g in groups)

    @property
    def filter_crosses(self) -> bool:
        return self._spans(self.filter_ranks(d) for d in range(self.replicas))

    @property
    def replica_crosses(self) -> bool:
        return self._spans(self.data_ranks(s) for s in range(self.workers))

    def describe(self) -> str:
        """The opening line's words: nodes, processes per node, layout, and which axis crosses nodes."""
        counts = sorted({self.nodes.count(n) for n in set(self.nodes)})
        per = "/".join(str(c) for c in counts)
        if self.num_nodes == 1:
            return f"1 node x {per} processes, {self.order}: no axis crosses nodes"
        crossing = [name for name, crosses in (("filter (S)", self.filter_crosses),
                                               ("replica (D)", self.replica_crosses)) if crosses]
        what = " and ".join(crossing) + (" axes cross" if len(crossing) > 1 else " axis crosses") + " nodes"
        if not crossing:
            what = "no axis crosses nodes"
        return f"{self.num_nodes} nodes x {per} processes, {self.order}: {what}"


def node_key(env=None) -> str:
    """This process's node as the launcher names it (hostname when the launcher names none)."""
    env = os.environ if env is None else env
    for var in NODE_VARIABLES:
        if env.get(var, "") != "":
            return f"{var}={env[var]}"
    return f"host={socket.gethostname()}"


def node_indices(keys: list[str]) -> list[int]:
    """Node index of every rank from the gathered node keys (0.. in order of first appearance)."""
    first: dict[str, int] = {}
    return [first.setdefault(k, len(first)) for k in keys]


def check_world(world_size: int, workers: int) -> int:
    """D for a world of ``world_size`` ranks and S=``workers``; an error names the sizes that work."""
    if workers < 1:
        raise GridError(f"--workers must be >= 1 (got {workers})")
    if world_size % workers:
        ok = ", ".join(str(workers * d) for d in range(1, 5))
        raise GridError(f"world size {world_size} is not a multiple of S={workers} filter workers: launch "
                        f"{ok}, ... processes, or choose --workers among the divisors of {world_size}")
    return world_size // workers


def plan_layout(nodes: list, workers: int, order: str = "auto") -> Layout:
    """The (worker, replica) coordinates of every rank, from the node of every rank (any hashable
    names; ranks of one node are expected to be contiguous, as every launcher numbers them)."""
    if order not in GRID_ORDERS:
        raise GridError(f"--grid_order must be one of {', '.join(GRID_ORDERS)} (got {order!r})")
    world = len(nodes)
    replicas = check_world(world, workers)
    index = node_indices([str(n) for n in nodes])
    if order == "auto":
        order = "workers-within-node" if len(set(index)) == 1 else "replicas-within-node"
    if order == "replicas-within-node":
        coords = [(r // replicas, r % replicas) for r in range(world)]
    else:
        coords = [(r % workers, r // workers) for r in range(world)]
    return Layout(order, workers, replicas, index, coords)


@dataclass
class FilterGrid:
    workers: int           # S
    replicas: int          # D
    rank: int
    filter_group: object   # ProcessGroup of the S workers of this replica (None when world is 1)
    data_group: object     # ProcessGroup of the D replicas of this worker
    filter_ranks: list[int]
    data_ranks: list[int]
    layout: Layout | None = None
    coords: tuple[int, int] | None = field(default=None)

    @property
    def filter_index(self) -> int:
        return self.coords[0] if self.coords is not None else self.rank % self.workers

    @property
    def data_index(self) -> int:
        return self.coords[1] if self.coords is not None else self.rank // self.workers

    @property
    def world_size(self) -> int:
        return self.workers * self.replicas

    @property
    def nodes(self) -> list[int]:
        """Node index of every global rank (all 0 without a layout)."""
        return self.layout.nodes if self.layout is not None else [0] * self.world_size


def gather_nodes() -> list[str]:
    """Every rank's node key, gathered over the default process group (one small collective)."""
    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, node_key())
    return keys


def build_grid(workers: int, order: str = "auto", timeout: float | None = None) -> FilterGrid:
    """The grid of the current (initialised) default process group, laid out over its nodes.
    ``timeout``: seconds any collective of the grid's groups may wait (new_group's default is 30 min,
    whatever the default group's timeout)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_world(world, workers)
    layout = plan_layout(gather_nodes() if world > 1 else ["0"], workers, order)
    kwargs = {"timeout": timedelta(seconds=timeout)} if timeout else {}
    filter_group = data_group = None
    filter_ranks = data_ranks = []
    for d in range(layout.replicas):  # every rank creates every group, in the same order
        ranks = layout.filter_ranks(d)
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            filter_group, filter_ranks = group, ranks
    for s in range(workers):
        ranks = layout.data_ranks(s)
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            data_group, data_ranks = group, ranks
    return FilterGrid(workers, layout.replicas, rank, filter_group, data_group, filter_ranks, data_ranks,
                      layout, layout.coords[rank])
