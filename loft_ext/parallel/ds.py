"""DeepSpeed: LoFT's filter axis as DeepSpeed's model-parallel group.

:class:`LoftMPU` presents the :class:`~loft_ext.parallel.grid.FilterGrid` to ``deepspeed.initialize``:
model parallel = the filter group (rank = worker index, world = S), data parallel = the replicas of a
worker (world = D), no pipeline. Each rank then wraps its own sub-network in one DeepSpeedEngine, so
DeepSpeed's gradient all-reduce and ZeRO partitioning run over the replicas of one worker only, and
LoFT's sync runs over the filter group between rounds.

It deliberately has no ``initialize_sequence_parallel``: DeepSpeed takes an mpu with that attribute
for its Ulysses helper, drops the data-parallel group and ignores model parallelism.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from .grid import FilterGrid
from loft_ext.errors import ConfigError

CLIP_MODES = ("joint", "separate")


class DeepSpeedConfigError(ConfigError):
    """A ds_config that cannot run LoFT correctly; the message names the key and what works."""


class LoftMPU:
    """The model-parallel unit DeepSpeed asks for (every method the installed version calls)."""

    def __init__(self, grid: FilterGrid):
        self.grid = grid

    # model parallel = the S filter workers of one replica
    def get_model_parallel_rank(self) -> int:
        return self.grid.filter_index

    def get_model_parallel_world_size(self) -> int:
        return self.grid.workers

    def get_model_parallel_group(self):
        return self.grid.filter_group

    # DeepSpeed prefers the tensor_model_parallel names when they exist
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of model-parallel rank 0 in this rank's filter group."""
        return self.grid.filter_ranks[0]

    # data parallel = the D replicas of this worker
    def get_data_parallel_rank(self) -> int:
        return self.grid.data_index

    def get_data_parallel_world_size(self) -> int:
        return self.grid.replicas

    def get_data_parallel_group(self):
        return self.grid.data_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.grid.data_ranks)

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self):
        return None


def load_ds_config(path: str, micro_batch: int, replicas: int | None) -> dict:
    """Read and check a ds_config for LoFT; every refusal names the key and the fix. With ``replicas``
    None (the world is not known yet) train_batch_size must be a multiple of micro batch x accumulation."""
    if not path:
        raise DeepSpeedConfigError("--deepspeed needs --deepspeed_config PATH (see ds_configs/)")
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"DeepSpeed config {path!r} does not exist; see ds_configs/ for the shipped ones")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"DeepSpeed config {path!r} is not valid JSON ({exc})") from None
    accum = cfg.get("gradient_accumulation_steps", 1)
    micro = cfg.get("train_micro_batch_size_per_gpu", micro_batch)
    if accum != 1:
        raise DeepSpeedConfigError(f"{path}: gradient_accumulation_steps={accum}; LoFT's local step is one "
                                   "optimizer step, set it to 1 (and raise the micro batch instead)")
    if "train_batch_size" not in cfg or cfg["train_batch_size"] == "auto":
        raise DeepSpeedConfigError(f"{path}: train_batch_size must be explicit (micro batch x accumulation x D "
                                   f"= {micro} x {accum} x {replicas or 'D'})")
    if replicas is None and (not isinstance(cfg["train_batch_size"], int) or cfg["train_batch_size"] % (micro * accum)):
        raise DeepSpeedConfigError(
            f"{path}: train_batch_size={cfg['train_batch_size']} is not train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x D = {micro} x {accum} x D for any number of replicas D")
    if replicas is not None and cfg["train_batch_size"] != micro * accum * replicas:
        raise DeepSpeedConfigError(
            f"{path}: train_batch_size={cfg['train_batch_size']} does not match train_micro_batch_size_per_gpu "
            f"x gradient_accumulation_steps x D = {micro} x {accum} x {replicas} = {micro * accum * replicas}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    low = [k for k in ("bf16", "fp16")
           if isinstance(cfg.get(k), dict) and cfg[k].get("enabled") not in (None, False, "false")]
    if low:
        # DeepSpeed casts the module itself to bf16/fp16: each round's fp32 slices would be rounded on the way
        # in and out of the worker (and the fp32 inputs refused by its convs); torch_autocast keeps fp32 weights
        raise DeepSpeedConfigError(
            f"{path}: {low[0]}.enabled casts the worker's weights to {low[0]}, which LoFT's per-round slice "
            f"load and write-back would round every round; replace the {low[0]!r} section with "
            f'"torch_autocast": {{"enabled": true, "dtype": "{"bfloat16" if low[0] == "bf16" else "float16"}"}} '
            "(as ds_configs/zero1_bf16_gpu.json)")
    if stage > 3:
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage {stage}: DeepSpeed's stages are 0-3")
    if "optimizer" in cfg:
        raise DeepSpeedConfigError(f"{path}: remove the 'optimizer' section: loft_ext passes its own SGD so "
                                   "that optimizer state per round (reset/carry) works the same everywhere")
    if "gradient_clipping" not in cfg:
        raise DeepSpeedConfigError(f"{path}: set gradient_clipping explicitly (DeepSpeed's default is 1.0, "
                                   "all-reduced over the filter workers every step); 0.0 turns it off")
    cfg["train_micro_batch_size_per_gpu"] = micro
    return cfg


def master_copy(engine) -> bool:
    """Whether DeepSpeed keeps an fp32 master copy that would overwrite in-place writes at step()."""
    stage = engine.zero_optimization_stage()
    return stage > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: dict, mpu: LoftMPU, clip: str):
    """One DeepSpeedEngine over one worker's sub-network. ``clip``: ``joint`` lets DeepSpeed clip the
    norm of all workers' gradients together (all-reduced over the filter group every step);
    ``separate`` clips each worker's own gradients (DeepSpeed's clipping is switched off and loft_ext
    clips between backward and step)."""
    import deepspeed

    if clip not in CLIP_MODES:
        raise DeepSpeedConfigError(f"--ds_clip must be one of {CLIP_MODES}, got {clip!r}")
    max_norm = float(cfg.get("gradient_clipping", 0.0))
    if clip == "separate":
        cfg = {**cfg, "gradient_clipping": 0.0}
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, mpu=mpu)
    release_shm_workspace()
    return engine, ds_optimizer, (max_norm if clip == "separate" else 0.0)


SHM_WORKSPACE = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
_shm_released = False


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory workspace once every rank has mapped it.

    When all ranks are local (the ``deepspeed`` launcher sets LOCAL_SIZE), DeepSpeed's CPU comm op maps one
    64 MiB /dev/shm segment per rank for ``inference_all_reduce`` and never unlinks it: every run left
    world-size segments in RAM (tmpfs) until the machine ran out of memory. loft_ext never calls that
    all-reduce. After the barrier every rank has mapped its peers' segments, so each rank unlinks its own
    name; the mappings stay valid and the memory goes when the processes exit, killed ones included.
    A no-op where DeepSpeed's communication was not started or made no segment; safe to call twice."""
    global _shm_released
    import sys

    if _shm_released or "deepspeed" not in sys.modules or not torch.distributed.is_initialized():
        return
    from deepspeed.comm import comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    if backend is None or getattr(backend, "shm_comm_op", None) is None:
        return
    torch.distributed.barrier()
    name = SHM_WORKSPACE.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                port=os.environ.get("MASTER_PORT", ""), rank=torch.distributed.get_rank())
    if os.path.exists(name):
        os.unlink(name)
    _shm_released = True


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


class ZeroThreeReplica:
    """ZeRO-3 partitions the parameters of the module it wraps (each becomes a placeholder plus this rank's
    partition, ``ds_tensor``), so the round cannot copy slices into it. The engine wraps a copy
    (``module``) of the worker's plain sub-network instead, which the round keeps loading and writing back:
    :meth:`push` (after each load) writes this rank's partition of every plain parameter into the module and
    DeepSpeed's fp32 master partition (no communication: every replica holds the same plain values);
    :meth:`pull` (before the sync) gathers the trained fp32 parameters (``safe_get_full_fp32_param``, an
    all-gather over the worker's replicas) into the plain sub-network. Buffers are copied both ways."""

    def __init__(self, plain: nn.Module):
        import copy

        self.plain = plain
        self.module = copy.deepcopy(plain)
        self.engine = None

    def _pairs(self):
        plain = dict(self.plain.named_parameters())
        return [(p, plain[name]) for name, p in self.engine.module.named_parameters()]

    def _buffers(self):
        plain = dict(self.plain.named_buffers())
        return [(b, plain[name]) for name, b in self.engine.module.named_buffers()]

    @torch.no_grad()
    def push(self) -> None:
        import torch.distributed as dist
        from deepspeed.utils import safe_set_full_fp32_param

        for p, value in self._pairs():
            flat = value.detach().reshape(-1)
            part = p.ds_tensor.data.view(-1)
            start = dist.get_rank(group=p.ds_process_group) * part.numel()
            piece = flat[start:start + part.numel()]
            part[:piece.numel()].copy_(piece)
            if p.data.numel() == flat.numel():  # a persistent (never released) parameter holds all of it
                p.data.copy_(value)
            safe_set_full_fp32_param(p, value.detach().float())
        for b, value in self._buffers():
            b.copy_(value)

    @torch.no_grad()
    def pull(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        for p, plain in self._pairs():
            plain.copy_(safe_get_full_fp32_param(p).view_as(plain).to(plain.dtype))
        for b, plain in self._buffers():
            plain.copy_(b)


@torch.no_grad()
def push_values(engine) -> None:
    """After a round's slices were copied into the module in place, make DeepSpeed's fp32 master copy
    (ZeRO 1/2, bf16/fp16 wrappers) take them; at ZeRO 0 in fp32 the module's tensors are the ones that
    step() updates, so there is nothing to do. (Resetting momentum needs no call: clearing the client
    optimizer's state clears the state ZeRO keeps in it.)"""
    if not master_copy(engine):
        return
    from deepspeed.utils import safe_set_full_fp32_param

    for p in engine.module.parameters():
        safe_set_full_fp32_param(p, p.detach().clone().float())


class ZeroCarriedState:
    """Carried optimizer state (``--optimizer_state carry``) under ZeRO 1-3, where the optimizer keeps it in
    flat fp32 partitions over the worker's D replicas: a mirror of it by parameter name, in each parameter's
    shape, for the sync strategy to read and write (:meth:`loft_ext.engine.loft.Worker.state_of`).
    :meth:`gather` (before a sync) assembles every state tensor with DeepSpeed's
    ``safe_get_full_optimizer_state`` (an all-reduce over the worker's replicas, DeepSpeed-side like its
    gradient all-reduce); :meth:`push` (after a load) writes the sliced state back into this rank's
    partition with ``safe_set_full_optimizer_state`` (no communication) and empties the mirror."""

    def __init__(self, engine, params: dict[str, nn.Parameter]):
        self.engine, self.params = engine, params  # the parameters DeepSpeed wraps, by sub-network name
        self.state_mirror: dict[str, dict[str, torch.Tensor]] = {}

    def _partitions(self) -> list[torch.Tensor]:
        zero = self.engine.optimizer  # ZeRO-1/2 and ZeRO-3 name their flat fp32 partitions differently
        return list(getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat)

    def _client_state(self) -> dict:
        return self.engine.optimizer.optimizer.state

    def _keys(self) -> list[str]:
        """Per-entry state keys (SGD's momentum_buffer): equal on every rank, which all step alike."""
        state = self._client_state()
        return sorted({key for flat in self._partitions() for key, v in state.get(flat, {}).items()
                       if torch.is_tensor(v) and v.shape == flat.shape})

    @torch.no_grad()
    def gather(self) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state

        self.state_mirror = {}
        for key in self._keys():
            for name, p in self.params.items():
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    self.state_mirror.setdefault(name, {})[key] = value.reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                                                else p.shape).clone()

    def _link(self, keys: set[str]) -> None:
        """Give every partition the state ``keys`` (zeros where missing: before the first step, as after a
        resume) and make DeepSpeed map each parameter's fragment of them: ZeRO-1/2 link those views once,
        after their first step, and safe_set_full_optimizer_state needs them."""
        zero, state = self.engine.optimizer, self._client_state()
        missing = False
        for flat in self._partitions():
            for key in keys:
                if key not in state[flat]:
                    state[flat][key] = torch.zeros_like(flat)
                    missing = True
        if hasattr(zero, "_hp_optimizer_states_linked") and (missing or not zero._hp_optimizer_states_linked):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    @torch.no_grad()
    def push(self) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        keys = {key for state in self.state_mirror.values() for key in state}
        if keys:
            self._link(keys)
        for name, state in self.state_mirror.items():
            for key, value in state.items():
                safe_set_full_optimizer_state(self.params[name], value.float(), key)
        self.state_mirror = {}


def _chain(*hooks):
    hooks = [h for h in hooks if h is not None]
    return (lambda: [h() for h in hooks]) if hooks else None


def wrap_worker(worker, make_optimizer, cfg: dict, mpu: LoftMPU, clip: str, carry: bool = False) -> float:
    """Give a LoFT worker its DeepSpeedEngine, wired for the round: ZeRO 0-2 wrap the worker's sub-network
    itself (the round's slices are pushed into the master copy after each load); ZeRO-3 wraps a
    :class:`ZeroThreeReplica` copy (pushed after each load, pulled before each sync). ``carry`` with ZeRO
    1-3: the optimizer state goes through a :class:`ZeroCarriedState` mirror (gathered before each sync,
    pushed after each load); at ZeRO 0 the client optimizer's own state is read in place.
    ``make_optimizer(params)`` builds the client optimizer (ZeRO 0-2 keep one already attached); returns
    the norm loft_ext clips to between backward and step (``clip="separate"``), else 0."""
    if zero_stage(cfg) == 3:
        zero3 = ZeroThreeReplica(worker.model)
        worker.optimizer = make_optimizer(zero3.module.parameters())
        worker.ds_engine, _, clip_norm = initialize(zero3.module, worker.optimizer, cfg, mpu, clip)
        zero3.engine = worker.ds_engine
        worker.after_load, worker.before_sync = zero3.push, zero3.pull
        params = dict(zero3.module.named_parameters())
    else:  # the optimizer a loop attached over the sub-network, if any
        if worker.optimizer is None:
            worker.optimizer = make_optimizer(worker.model.parameters())
        worker.ds_engine, _, clip_norm = initialize(worker.model, worker.optimizer, cfg, mpu, clip)
        worker.after_load = lambda e=worker.ds_engine: push_values(e)
        params = dict(worker.model.named_parameters())
    if carry and zero_stage(cfg) > 0:
        worker.zero_state = ZeroCarriedState(worker.ds_engine, params)
        worker.after_load = _chain(worker.after_load, worker.zero_state.push)
        worker.before_sync = _chain(worker.before_sync, worker.zero_state.gather)
    return clip_norm
