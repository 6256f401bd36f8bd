"""Debug checks of rank consistency: hashes of the assembled model and of every sub-network step."""
from __future__ import annotations

import hashlib
import json

import torch
from torch.distributed.tensor import DTensor

from ..parallel import ds
from ..partition.subnet import read_slice, tensors_of
from ..plugins.base import Plugin


def model_hash(model: torch.nn.Module, params_only: bool = False) -> str:
    """sha256 of every parameter (and buffer), in state_dict order (a debug check of rank consistency)."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters()) if params_only else tensors_of(model)
    for name, t in tensors.items():
        if isinstance(t, DTensor):  # an FSDP shard: the whole parameter (a collective over its mesh)
            t = t.full_tensor()
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class DebugHashes(Plugin):
    """Appends the assembled model's hash after every sync, and the sub-network's parameters' hash
    after every step (replicas share parameters at every step; their BN statistics meet at the sync)."""

    name = "debug_hashes"

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "w")

    def wants_model(self, loop, round_index, epoch_end):
        return True

    def on_round_start(self, loop, round_index):
        """Under DeepSpeed: the round's slices must be what the engine (and its fp32 master copy) holds."""
        for w in loop.engine.workers:
            if w.ds_engine is None:
                continue
            from deepspeed.utils import safe_get_full_fp32_param

            ok = True
            # the engine's parameters: the plain sub-network's own (ZeRO 0-2) or, under ZeRO-3, those of the
            # partitioned copy (ds.ZeroThreeReplica), whose fp32 master is gathered here (a collective)
            trained = dict(w.ds_engine.module.named_parameters())
            for name, p in w.model.named_parameters():
                full = w.slicer.full_tensors[name]
                if full.numel():  # the full model is current (allgather): the module holds its slice
                    ok &= torch.equal(p.detach(), read_slice(full, w.slicer.indices(loop.engine.partition, name)))
                master = safe_get_full_fp32_param(trained[name])
                ok &= master is None or torch.equal(master.to(p.dtype).view_as(p), p.detach())
            self.file.write(json.dumps({"round": round_index, "master_matches": bool(ok),
                                        "master_copy": ds.master_copy(w.ds_engine)}) + "\n")

    def on_local_step_end(self, loop, worker, step, loss):
        w = loop.engine.workers[loop.local_index[worker]]
        # the trained values: under --replicas fsdp the sharded copy (the plain one is loaded per round)
        sub = w.sharded.module if w.sharded is not None else w.model
        self.file.write(json.dumps({"round": loop.state.round_index, "worker": worker, "step": step,
                                    "subnet": model_hash(sub, params_only=True)}) + "\n")

    def on_after_sync(self, loop, round_index, model):
        self.file.write(json.dumps({"round": round_index, "assembled": model_hash(model)}) + "\n")
        self.file.flush()

    def on_ticket_found(self, loop, detector, info):
        self.file.write(json.dumps({"round": info["round"], "ticket": detector}) + "\n")

    def on_fit_end(self, loop, metrics):
        self.file.close()
