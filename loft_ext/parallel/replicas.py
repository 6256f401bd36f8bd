"""D data-parallel replicas of one filter worker: torch's DistributedDataParallel over the grid's data group.

DDP overlaps the gradient all-reduce with backward (bucket by bucket). Two choices keep LoFT's numbers:
``broadcast_buffers=False`` (replicas' BatchNorm statistics meet at the round's sync, averaged there, as in
the simulation) and a communication hook that goes through :class:`~loft_ext.parallel.comm.Comm`, so the
bytes are counted under ``dp_grad`` like every other collective.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def _counting_mean_hook(state, bucket):
    """Mean of the bucket over the data group (divide, then sum: exact for D a power of two)."""
    comm, group, replicas = state
    flat = bucket.buffer()
    flat.div_(replicas)
    with comm.phase("dp_grad"):
        fut = comm.all_reduce_async(flat, group=group)
    return fut.then(lambda f: f.value()[0] if isinstance(f.value(), list) else f.value())


def wrap_replicas(model: nn.Module, grid, comm) -> nn.Module:
    """``model`` wrapped in DDP over this rank's data group (``model`` itself when D is 1)."""
    if grid is None or grid.replicas == 1:
        return model
    device_ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=grid.data_group,
                                  broadcast_buffers=False, init_sync=False)
    ddp.register_comm_hook((comm, grid.data_group, grid.replicas), _counting_mean_hook)
    return ddp


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


__all__ = ["wrap_replicas", "unwrap"]
