"""D replicas of one filter worker as one FSDP2-sharded sub-network (``--replicas fsdp``).

The worker's plain sub-network (``Worker.model``) stays what the LoFT round works on: the slicer loads a
round's slices into it and writes it back, and the filter-axis sync reads it. Training runs on a sharded
copy (``module``): ``fully_shard`` over the mesh's ``"shard"`` dimension (the worker's D ranks), blocks
first, then the root, as FSDP2 expects. So each rank stores 1/D of the sub-network's parameters,
gradients (reduce-scattered every step) and optimizer state (the optimizer is built over the sharded
parameters).

The copy is sharded once per run and refilled every round instead of re-wrapped: after a round's slices
are loaded, :meth:`ShardedReplica.load` copies this rank's dim-0 chunk of every plain tensor into its
local shard (no communication: every replica holds the same plain values), so the optimizer a loop built
over ``module.parameters()`` stays valid. Before the round's sync, :meth:`gather` all-gathers the full
parameters (``DTensor.full_tensor()``) back into the plain sub-network. BatchNorm buffers are not
sharded; they are copied both ways.

FSDP's own collectives (all-gathers of parameters, reduce-scatters of gradients) do not go through
:class:`~loft_ext.parallel.comm.Comm`; :func:`loft_ext.parallel.analytic.fsdp_step_bytes` gives their
analytic count, reported beside the measured phases (docs/fsdp.md).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: every non-container child of a Sequential / ModuleList /
    ModuleDict that holds parameters (timm's residual and inverted-residual blocks inside its stages),
    without descending into them; the rest (stem, head) stays with the root."""
    units: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                walk(child)
            elif isinstance(module, _CONTAINERS) and any(True for _ in child.parameters()):
                units.append(child)
            else:
                walk(child)
    walk(model)
    return units


def keeps_fp32(module: nn.Module) -> bool:
    """A norm with running statistics and parameters (BatchNorm and timm's BatchNormAct2d and relatives):
    torch's batch_norm needs its weight in the dtype of its fp32 running statistics, so a bf16 cast of its
    parameters fails (on the CPU: "expected scalar type BFloat16 but found Float"). It is sharded as a group
    of its own that keeps fp32 parameters, as FSDP1's MixedPrecision keeps _BatchNorm modules by default."""
    return (isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and any(True for _ in module.parameters(recurse=False)))


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 compute and parameter all-gathers, fp32 gradient reduce-scatter (``--mixed_precision bf16``)."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_shape(shape: tuple[int, ...], parts: int, index: int) -> tuple[int, ...]:
    """Shape of shard ``index`` of ``parts`` of a tensor of ``shape``: its dim-0 chunk as ``torch.chunk``
    (and FSDP2, and DTensor's ``Shard(0)``) cut it; empty when the chunks run out. A 0-dim tensor is shard
    0's whole (as a 1-element tensor)."""
    if not shape:
        return (1,) if index == 0 else (0,)
    c = -(-shape[0] // parts)
    return (max(0, min(c, shape[0] - index * c)), *shape[1:])


def shard_of(t: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Shard ``index`` of ``parts`` of ``t`` (a view; :func:`shard_shape`)."""
    if t.dim() == 0:
        return t.reshape(1) if index == 0 else t.new_empty(0)
    c = -(-t.shape[0] // parts)
    return t.narrow(0, min(index * c, t.shape[0]), shard_shape(tuple(t.shape), parts, index)[0])


class ShardedReplica:
    """The sharded training copy of a worker's plain sub-network ``model`` over ``shard_mesh``."""

    def __init__(self, model: nn.Module, shard_mesh, mixed_precision: str = "no"):
        self.plain = model
        self.mesh, self.mixed_precision = shard_mesh, mixed_precision
        self.module = copy.deepcopy(model)
        policy = mixed_precision_policy(mixed_precision)
        fp32 = [m for m in self.module.modules() if keeps_fp32(m)] if mixed_precision != "no" else []
        for norm in fp32:  # norms with running statistics keep fp32 parameters (groups of their own)
            fully_shard(norm, mesh=shard_mesh, mp_policy=MixedPrecisionPolicy())
        for unit in shard_units(self.module):
            if not any(unit is norm for norm in fp32):  # a norm that is a unit itself is sharded already
                fully_shard(unit, mesh=shard_mesh, mp_policy=policy)
        fully_shard(self.module, mesh=shard_mesh, mp_policy=policy)
        self._plain_params = dict(model.named_parameters())
        self._plain_buffers = dict(model.named_buffers())
        self._sharded_params = dict(self.module.named_parameters())
        self._layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # released plain parameters
        # carried optimizer state as whole sub-network-shaped tensors, by parameter name: what a sync strategy
        # reads (after gather) and writes (before load); empty while the round trains on the shards
        self.state_mirror: dict[str, dict[str, torch.Tensor]] = {}

    def param(self, name: str) -> nn.Parameter:
        """The sharded copy of sub-network parameter ``name`` (the optimizer's key for its state)."""
        return self._sharded_params[name]

    @torch.no_grad()
    def load(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every local shard from the plain sub-network (this rank's dim-0 chunk; FSDP2 chunks like
        ``torch.chunk``), and the buffers; with ``optimizer``, the mirrored optimizer state too
        (:meth:`load_state`)."""
        for name, p in self.module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            full = self._plain_params[name]
            chunk = self._chunk(full, p)
            if local.shape != chunk.shape:
                raise RuntimeError(f"FSDP shard of {name} has shape {tuple(local.shape)}, expected "
                                   f"{tuple(chunk.shape)} (torch.chunk of {tuple(full.shape)} over the shard mesh)")
            local.copy_(chunk)
        for name, b in self.module.named_buffers():
            b.copy_(self._plain_buffers[name])
        if optimizer is not None:
            self.load_state(optimizer)
        self.release()

    @torch.no_grad()
    def load_state(self, optimizer: torch.optim.Optimizer) -> None:
        """This rank's chunk of every mirrored per-entry state tensor into the optimizer's state of the sharded
        parameter (a DTensor laid out like the parameter; created when the optimizer has none yet, as after a
        resume); other state (Adam's step) as it is. No communication; the mirror is emptied."""
        for name, state in self.state_mirror.items():
            p = self._sharded_params[name]
            dest = optimizer.state[p]
            for key, value in state.items():
                if not (isinstance(p, DTensor) and value.dim() > 0 and tuple(value.shape) == tuple(p.shape)):
                    dest[key] = value.clone()
                    continue
                chunk = self._chunk(value, p)
                old = dest.get(key)
                if isinstance(old, DTensor) and old.to_local().shape == chunk.shape:
                    old.to_local().copy_(chunk)
                else:
                    dest[key] = DTensor.from_local(chunk.clone(), p.device_mesh, p.placements, run_check=False,
                                                   shape=p.shape, stride=p.stride())
        self.state_mirror = {}

    def release(self) -> None:
        """Free the plain copy's parameter storage once the shards hold the round's values: during the round
        only the shards are trained and read (the sync reads them too), so a rank holds 1/D of the
        sub-network's parameters; :meth:`materialize` gives the storage back before the next load."""
        for name, p in self._plain_params.items():
            if name not in self._layouts:
                self._layouts[name] = (tuple(p.shape), p.stride())
                p.data = p.data.new_empty(0)

    def materialize(self) -> None:
        """Storage (in the released layout, contents undefined) for every released plain parameter."""
        for name, (shape, stride) in self._layouts.items():
            p = self._plain_params[name]
            p.data = torch.empty_strided(shape, stride, dtype=p.dtype, device=p.device)
        self._layouts.clear()

    def _chunk(self, full: torch.Tensor, p) -> torch.Tensor:
        return shard_of(full, self.mesh.size(), self.mesh.get_local_rank()) if isinstance(p, DTensor) else full

    def local_shard(self, name: str) -> torch.Tensor:
        """This rank's shard of parameter ``name`` (the trained values)."""
        p = self._sharded_params[name]
        return p.to_local() if isinstance(p, DTensor) else shard_of(p, self.mesh.size(), self.mesh.get_local_rank())

    @torch.no_grad()
    def gather_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Every optimizer state tensor of the sharded parameters, whole (``DTensor.full_tensor``: an
        all-gather over the shard mesh, like the parameters'), into :attr:`state_mirror`."""
        self.state_mirror = {}
        for name, p in self._sharded_params.items():
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    whole = value.full_tensor() if isinstance(value, DTensor) else value.clone()
                    self.state_mirror.setdefault(name, {})[key] = whole

    @torch.no_grad()
    def gather(self, params: bool = True) -> None:
        """The full parameters (all-gathered over the shard mesh; skipped without ``params``) and the
        buffers into the plain sub-network."""
        if params:
            self.materialize()
        for name, p in self.module.named_parameters() if params else ():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            self._plain_params[name].copy_(full)
        for name, b in self.module.named_buffers():
            self._plain_buffers[name].copy_(b)


def local_bytes(tensors) -> int:
    """Bytes this rank stores for ``tensors`` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def training_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes this rank holds for a worker's training module."""
    params = list(module.parameters())
    state = [v for p in params for v in optimizer.state.get(p, {}).values()]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optimizer_state": local_bytes(state)}


__all__ = ["ShardedReplica", "shard_of", "shard_shape", "shard_units", "keeps_fp32", "mixed_precision_policy", "local_bytes",
           "training_state_bytes"]
