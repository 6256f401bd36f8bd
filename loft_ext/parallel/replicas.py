"""D data-parallel replicas of one filter worker: DDP (``--replicas ddp``) or FSDP2 (``--replicas fsdp``).

DDP: torch's DistributedDataParallel over the grid's data group. It overlaps the gradient all-reduce with
backward (bucket by bucket). Two choices keep LoFT's numbers: ``broadcast_buffers=False`` (replicas'
BatchNorm statistics meet at the round's sync, averaged there, as in the simulation) and a communication
hook that goes through :class:`~loft_ext.parallel.comm.Comm`, so the bytes are counted under ``dp_grad``
like every other collective.

FSDP: the worker's sub-network sharded over the mesh's ``"shard"`` dimension
(:class:`~loft_ext.parallel.sharded.ShardedReplica`); gradients are reduce-scattered by FSDP itself (not
counted by ``Comm``; see :func:`loft_ext.parallel.analytic.fsdp_step_bytes`). Carried optimizer state
(``--optimizer_state carry``) is sharded like the parameters and moves with them.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError

REPLICA_MODES = ("ddp", "fsdp")


def check_replicas(replicas: str) -> None:
    """An unknown replica mode as a one-line error."""
    if replicas not in REPLICA_MODES:
        raise ConfigError(f"--replicas must be one of {', '.join(REPLICA_MODES)} (got {replicas!r})")


def _counting_mean_hook(state, bucket):
    """Mean of the bucket over the data group (divide, then sum: exact for D a power of two)."""
    comm, group, replicas = state
    flat = bucket.buffer()
    flat.div_(replicas)
    with comm.phase("dp_grad"):
        fut = comm.all_reduce_async(flat, group=group)
    return fut.then(lambda f: f.value()[0] if isinstance(f.value(), list) else f.value())


def ddp_replicas(model: nn.Module, grid, comm) -> nn.Module:
    """``model`` wrapped in DDP over this rank's data group (``model`` itself when D is 1)."""
    if grid is None or grid.replicas == 1:
        return model
    device_ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=grid.data_group,
                                  broadcast_buffers=False, init_sync=False)
    ddp.register_comm_hook((comm, grid.data_group, grid.replicas), _counting_mean_hook)
    return ddp


def wrap_replicas(worker, grid, comm, replicas: str = "ddp", mixed_precision: str = "no", carry: bool = False):
    """Set ``worker.module`` to what the loop trains for this rank's D replicas; returns the grid's
    ``DeviceMesh`` when one was built (FSDP with D > 1), else None. With D = 1 both modes leave the bare
    sub-network: there is nothing to replicate or shard. ``carry``: the sync reads the optimizer state
    (under FSDP it is gathered with the parameters before the sync and pushed into the shards after a load)."""
    if grid is None or grid.replicas == 1:
        worker.module = worker.model
        return None
    if replicas == "ddp":
        worker.module = ddp_replicas(worker.model, grid, comm)
        return None
    from .mesh import build_mesh
    from .sharded import ShardedReplica

    mesh = build_mesh(grid, "fsdp")
    worker.sharded = ShardedReplica(worker.model, mesh["shard"], mixed_precision)
    worker.module = worker.sharded.module
    sharded = worker.sharded
    worker.before_load, worker.after_load = sharded.materialize, lambda: sharded.load(worker.optimizer)
    if carry:
        worker.before_sync = lambda: (sharded.gather(), sharded.gather_state(worker.optimizer))
    else:
        worker.before_sync = sharded.gather
    return mesh


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


__all__ = ["wrap_replicas", "ddp_replicas", "check_replicas", "unwrap", "REPLICA_MODES"]
