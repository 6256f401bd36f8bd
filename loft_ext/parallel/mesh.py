"""The LoFT process grid as a 2-D torch ``DeviceMesh`` of shape (S, D).

Entry ``[s, d]`` of the mesh is the global rank of worker s, replica d (``Layout.rank_of``), so both grid
orders (``workers-within-node`` and ``replicas-within-node``) give the same mesh *coordinates*; only the
rank numbers in it differ. Dimension 0 is the filter axis (``"filter"``: the S workers of one replica),
dimension 1 the replica axis, named ``"shard"`` when FSDP shards the worker over it and ``"replica"``
when DDP replicates it.

The mesh is built from the grid's own process groups (``DeviceMesh.from_group``) rather than letting
torch create a second pair of groups per dimension: the groups already exist on every rank, were created
in the same order everywhere (``build_grid``), carry the run's ``--collective_timeout``, and a mesh built
on them holds exactly the grid's ranks by construction. Build it once per run (``build_mesh``), after
``build_grid``, on every rank.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from .grid import FilterGrid

FILTER_DIM = "filter"
REPLICA_DIMS = {"fsdp": "shard", "ddp": "replica"}


def mesh_tensor(layout) -> torch.Tensor:
    """The (S, D) tensor of global ranks: ``[s, d]`` is worker s, replica d."""
    return torch.tensor([[layout.rank_of(s, d) for d in range(layout.replicas)] for s in range(layout.workers)],
                        dtype=torch.int)


def build_mesh(grid: FilterGrid, replicas: str = "ddp", device_type: str | None = None) -> DeviceMesh:
    """The grid as a ``DeviceMesh`` with dims ``("filter", "shard")`` (``replicas="fsdp"``) or
    ``("filter", "replica")`` (``"ddp"``), over the grid's existing filter and data groups."""
    if grid.layout is None:
        raise ValueError("build_mesh needs a grid built by build_grid (it has the layout of every rank)")
    device_type = device_type or ("cuda" if torch.cuda.is_available() and _grid_on_cuda() else "cpu")
    names = (FILTER_DIM, REPLICA_DIMS[replicas])
    return DeviceMesh.from_group([grid.filter_group, grid.data_group], device_type, mesh=mesh_tensor(grid.layout),
                                 mesh_dim_names=names)


def _grid_on_cuda() -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "nccl"


__all__ = ["build_mesh", "mesh_tensor", "FILTER_DIM", "REPLICA_DIMS"]
