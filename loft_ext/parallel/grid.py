"""The LoFT process grid: S filter workers x D data-parallel replicas.

Rank r is filter worker ``r % S`` of replica ``r // S``. The S ranks of one replica form a *filter
group* (together they hold one full model); the D ranks that are the same worker form a *data group*
(they hold identical sub-networks and average gradients every step). Every rank creates every group
in the same order, as torch.distributed requires.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from loft_ext.errors import ConfigError


class GridError(ConfigError):
    """A world size and worker count that do not form a grid; the message lists sizes that work."""


@dataclass
class FilterGrid:
    workers: int           # S
    replicas: int          # D
    rank: int
    filter_group: object   # ProcessGroup of the S workers of this replica (None when world is 1)
    data_group: object     # ProcessGroup of the D replicas of this worker
    filter_ranks: list[int]
    data_ranks: list[int]

    @property
    def filter_index(self) -> int:
        return self.rank % self.workers

    @property
    def data_index(self) -> int:
        return self.rank // self.workers

    @property
    def world_size(self) -> int:
        return self.workers * self.replicas


def check_world(world_size: int, workers: int) -> int:
    """D for a world of ``world_size`` ranks and S=``workers``; an error names the sizes that work."""
    if workers < 1:
        raise GridError(f"--workers must be >= 1 (got {workers})")
    if world_size % workers:
        ok = ", ".join(str(workers * d) for d in range(1, 5))
        raise GridError(f"world size {world_size} is not a multiple of S={workers} filter workers: launch "
                        f"{ok}, ... processes, or choose --workers among the divisors of {world_size}")
    return world_size // workers


def build_grid(workers: int) -> FilterGrid:
    """The grid of the current (initialised) default process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    replicas = check_world(world, workers)
    filter_group = data_group = None
    filter_ranks = data_ranks = []
    for d in range(replicas):  # every rank creates every group, in the same order
        ranks = [d * workers + s for s in range(workers)]
        group = dist.new_group(ranks)
        if rank in ranks:
            filter_group, filter_ranks = group, ranks
    for s in range(workers):
        ranks = [d * workers + s for d in range(replicas)]
        group = dist.new_group(ranks)
        if rank in ranks:
            data_group, data_ranks = group, ranks
    return FilterGrid(workers, replicas, rank, filter_group, data_group, filter_ranks, data_ranks)
