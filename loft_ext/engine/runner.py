"""Builds a LoFT pretraining run from hparams and stores it under a directory named by their hash.

Accelerate owns process start, device placement and autocast; the run builds the S x D grid over
the processes Accelerate started (world size 1: all S workers simulated in this process).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, CheckpointStore, write_json_atomic
from ..data import DATA_ORDERS, DATASETS, BatchStream, DataBundle, DataError, load_dataset
from ..hparams import Hparams, field, hparams_hash
from ..models import create_model
from ..parallel import analytic
from ..parallel import ds
from ..parallel.ds import CLIP_MODES, DeepSpeedConfigError, LoftMPU
from ..parallel.grid import GRID_ORDERS, GridError, build_grid, check_world, plan_layout
from ..parallel.sync import STRATEGIES, AllGatherSync
from ..partition.plan import PRESETS, make_plan
from ..partition.subnet import read_slice, tensors_of
from ..plugins.base import Plugin
from ..plugins.distance import DistanceStop, FilterDistance
from ..plugins.earlybird import EarlyBird
from ..plugins.guard import NonFiniteGuard
from ..plugins.preemption import Preemption
from ..plugins.progress import Progress
from ..tracking import RunLogger, TrackingError, resolve_wandb_mode, wandb_run_id
from . import checkpointing
from .checkpointing import CHECKPOINT_DIR, Checkpointer
from .loft import OPTIMIZER_STATE_MODES, LoFTEngine
from ..errors import ConfigError, Preempted, TrainingFailure
from .loop import LoFTLoop, lr_at


METHODS = ("loft", "dense", "earlybird", "random")


@dataclass
class ModelHparams(Hparams):
    """Model"""

    model: str = field("resnet18", "timm model name, created with pretrained=False")
    preset: str = field("paper", "channel groups to split: 'paper' (stem, head, first stage and first "
                        "block of each stage shared, as the authors' release) or 'all' (every "
                        "splittable group)", PRESETS)


@dataclass
class DataHparams(Hparams):
    """Data"""

    dataset: str = field("digits", "data set; digits is built in, the others are read from --data_dir",
                         DATASETS)
    data_dir: str = field("", "directory in torchvision's layout (cifar10/cifar100/fashion_mnist) or "
                          "with train/ and val/ class folders (imagefolder); never downloaded")
    image_size: int = field(0, "input resolution; 0 = the data set's default (digits: 32)")
    batch_size: int = field(64, "per-worker training batch size")
    eval_batch_size: int = field(256, "evaluation batch size")
    data_order: str = field("own-shuffle", "own-shuffle: each worker its own order of the full set "
                            "(the release); shard: disjoint 1/S shards", DATA_ORDERS)
    augment: bool = field(True, "random crop/flip for cifar and imagefolder training sets")


@dataclass
class LoftHparams(Hparams):
    """LoFT"""

    workers: int = field(2, "S: filter workers; each trains a 1/S-wide sub-network of the split groups")
    local_steps: int = field(4, "L: local steps per worker between two syncs (one round)")
    optimizer_state: str = field("reset", "reset: momentum cleared each round (paper); carry: kept in a "
                                 "full-size buffer sliced like the weights", OPTIMIZER_STATE_MODES)
    method: str = field("loft", "pretraining: loft (S filter workers), dense (plain training of the full "
                        "model: S=1, momentum carried), earlybird (dense, stopped by Early-Bird, BN-gamma "
                        "tickets) or random (loft pretraining, random tickets with the same per-layer "
                        "ratios: the control)", METHODS)
    sync: str = field("allgather", "distributed sync: allgather (every rank keeps the full model) or "
                      "alltoall (ranks keep only their part and exchange what the next round needs)",
                      STRATEGIES)


@dataclass
class TrainHparams(Hparams):
    """Training"""

    epochs: int = field(8, "pretraining epochs (one epoch = every worker passes its data once)")
    rounds: int = field(0, "number of rounds; overrides --epochs when > 0")
    lr: float = field(0.1, "base learning rate")
    lr_schedule: str = field("step", "step (divide at milestones), cosine or constant",
                             ("step", "cosine", "constant"))
    lr_milestones: tuple[float, ...] = field((0.5, 0.75), "fractions of the rounds where lr *= lr_gamma")
    lr_gamma: float = field(0.1, "lr factor at each milestone")
    momentum: float = field(0.9, "SGD momentum")
    weight_decay: float = field(5e-4, "SGD weight decay")
    seed: int = field(0, "run seed: model init, partitions and data orders")
    bn_recalibration_batches: int = field(8, "training batches used to re-estimate BatchNorm statistics "
                                          "of the assembled model before each evaluation (0 = off)")


@dataclass
class DetectorHparams(Hparams):
    """Filter distance and ticket detectors"""

    distance_layers: str = field("split", "layers whose filters are ranked: split (producers of the split "
                                 "groups), all (every conv) or none", ("split", "all", "none"))
    distance_every: int = field(0, "record filter rankings every k rounds; 0 = at every epoch end")
    distance_window: int = field(5, "filter-distance stop rule: number of recent records compared")
    distance_eps: float = field(0.1, "filter-distance stop rule: threshold on the normalised distance")
    distance_stop: bool = field(False, "stop pretraining when the filter-distance rule fires (else report)")
    earlybird: bool = field(True, "run the Early-Bird detector (BN-gamma channel masks)")
    earlybird_ratio: float = field(0.5, "Early-Bird pruning ratio p of the BN-gamma mask")
    earlybird_every: int = field(0, "Early-Bird check every k rounds; 0 = at every epoch end")
    earlybird_stop: bool = field(False, "stop pretraining when Early-Bird fires (else report)")


@dataclass
class DeepSpeedHparams(Hparams):
    """DeepSpeed (docs/deepspeed.md)"""

    deepspeed: bool = field(False, "wrap each rank's sub-network in a DeepSpeedEngine whose model-parallel "
                            "group is the filter axis (launch with `deepspeed --num_gpus N`)")
    deepspeed_config: str = field("", "ds_config JSON (see ds_configs/); train_batch_size must equal "
                                  "micro batch x accumulation x D")
    ds_clip: str = field("joint", "with gradient_clipping > 0: clip all workers' gradients jointly "
                         "(DeepSpeed's norm over the filter group) or each worker separately", CLIP_MODES)
    local_rank: int = field(-1, "set by the deepspeed launcher (ignored: the rank comes from the environment)")


@dataclass
class CheckpointHparams(Hparams):
    """Checkpoints and fault tolerance (docs/reliability.md)"""

    checkpoint_every: int = field(0, "checkpoint the full LoFT state every k rounds into <run_dir>/checkpoints/; "
                                  "0 = at every epoch end, -1 = only when preempted (SIGTERM/SIGINT)")
    keep_checkpoints: int = field(2, "complete checkpoints kept (older ones are deleted after a new one is "
                                  "committed)")
    resume: str = field("", "continue an unfinished run: 'latest' (the newest complete checkpoint in the run "
                        "directory; a fresh start if there is none) or a checkpoint directory")
    collective_timeout: float = field(1800.0, "seconds any collective may wait; a rank that died or hangs ends "
                                      "the job after at most this long")


@dataclass
class OutputHparams(Hparams):
    """Output and runtime"""

    output_dir: str = field("runs", "runs are stored in <output_dir>/<model>-<hash of hparams>/")
    force: bool = field(False, "retrain a run that already finished, or restart an unfinished one that has "
                        "checkpoints (the old directory is kept, renamed)")
    mixed_precision: str = field("no", "autocast for the workers' forward passes (bf16 on GPU)", ("no", "bf16"))
    channels_last: bool = field(False, "channels_last memory format for conv weights and input batches, in "
                                "pretraining and fine-tuning (timm's --channels-last: faster convolutions with "
                                "bf16 on recent GPUs)")
    cpu: bool = field(False, "run on CPU even when GPUs are present (gloo instead of NCCL)")
    grid_order: str = field("auto", "placement of the S x D grid on the nodes: replicas-within-node (a worker's D "
                            "replicas on one node; the filter axis crosses nodes), workers-within-node (the "
                            "other way round) or auto (replicas-within-node on more than one node); an execution "
                            "choice, not part of the run's hash", GRID_ORDERS)
    data_workers: int = field(0, "DataLoader worker processes per rank for the training batches; the batches "
                              "do not depend on it (augmentation is seeded per sample)")
    tracker: str = field("wandb", "experiment tracker through Accelerate: wandb or none (files in the run "
                         "directory are always written)", ("wandb", "none"))
    wandb_project: str = field("loft_ext", "W&B project")
    wandb_group: str = field("", "W&B group (one experiment); default <model>-<dataset>")
    wandb_mode: str = field("", "W&B mode: offline, online or disabled; default WANDB_MODE, else offline")
    debug_hashes: bool = field(False, "write a hash of the assembled model after every round (and of each "
                               "rank's sub-network after every step) to hashes-rank<r>.jsonl")


PRETRAIN_HPARAMS = (ModelHparams, DataHparams, LoftHparams, TrainHparams, DetectorHparams, OutputHparams)


def validate_checkpointing(ckpt_hp: CheckpointHparams) -> None:
    checks = [
        (ckpt_hp.checkpoint_every >= -1, f"--checkpoint_every must be >= -1 (got {ckpt_hp.checkpoint_every})"),
        (ckpt_hp.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1 (got {ckpt_hp.keep_checkpoints})"),
        (ckpt_hp.collective_timeout > 0, f"--collective_timeout must be > 0 seconds (got {ckpt_hp.collective_timeout})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate(model_hp, data_hp, loft_hp, train_hp, det_hp) -> None:
    checks = [
        (det_hp.distance_every >= 0, f"--distance_every must be >= 0 (got {det_hp.distance_every})"),
        (det_hp.distance_window >= 2, f"--distance_window must be >= 2 (got {det_hp.distance_window})"),
        (det_hp.distance_eps > 0, f"--distance_eps must be > 0 (got {det_hp.distance_eps})"),
        (0 <= det_hp.earlybird_ratio < 1, f"--earlybird_ratio must be in [0, 1) (got {det_hp.earlybird_ratio})"),
        (det_hp.earlybird_every >= 0, f"--earlybird_every must be >= 0 (got {det_hp.earlybird_every})"),
        (loft_hp.workers >= 1, f"--workers must be >= 1 (got {loft_hp.workers})"),
        (loft_hp.local_steps >= 1, f"--local_steps must be >= 1 (got {loft_hp.local_steps})"),
        (data_hp.batch_size >= 1, f"--batch_size must be >= 1 (got {data_hp.batch_size})"),
        (data_hp.eval_batch_size >= 1, f"--eval_batch_size must be >= 1 (got {data_hp.eval_batch_size})"),
        (train_hp.epochs >= 1 or train_hp.rounds >= 1, "set --epochs >= 1 or --rounds >= 1"),
        (train_hp.lr > 0, f"--lr must be > 0 (got {train_hp.lr})"),
        (0 <= train_hp.momentum < 1, f"--momentum must be in [0, 1) (got {train_hp.momentum})"),
        (train_hp.weight_decay >= 0, f"--weight_decay must be >= 0 (got {train_hp.weight_decay})"),
        (all(0 < m < 1 for m in train_hp.lr_milestones), "--lr_milestones are fractions in (0, 1)"),
        (data_hp.image_size >= 0, f"--image_size must be >= 0 (got {data_hp.image_size})"),
        (not det_hp.distance_stop or det_hp.distance_layers != "none",
         "--distance_stop needs the filter distance: drop --distance_layers none (or --distance_stop)"),
        (not det_hp.earlybird_stop or det_hp.earlybird,
         "--earlybird_stop needs the Early-Bird detector: drop --earlybird false (or --earlybird_stop)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def prepare_run_dir(output_dir: str, name: str, force: bool, resume: str = "") -> tuple[str, bool]:
    """(run directory, already finished?). Nothing of value is ever overwritten: a finished run, or an
    unfinished one with checkpoints when not resuming, is refused unless ``force``, which renames it to
    <dir>.old-N first."""
    run_dir = os.path.join(output_dir, name)
    done = os.path.exists(os.path.join(run_dir, "summary.json"))
    checkpoints = CheckpointStore(os.path.join(run_dir, CHECKPOINT_DIR)).complete()
    if not done and checkpoints and not resume and not force:
        raise ConfigError(f"{run_dir} holds checkpoints of an unfinished run (up to {checkpoints[-1]}); pass "
                          "--resume latest to continue it, or --force to start over (the old directory is kept, "
                          "renamed)")
    if (done or checkpoints) and force and not resume:
        n = 1
        while os.path.exists(f"{run_dir}.old-{n}"):
            n += 1
        shutil.move(run_dir, f"{run_dir}.old-{n}")
        done = False
    if not done:
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir!r} ({exc.strerror}); "
                              "pass a writable --output_dir") from None
    return run_dir, done


def truncate_logs(run_dir: str, rounds_done: int) -> None:
    """Keep only log lines of rounds up to ``rounds_done`` (a resumed run rewrites the rest)."""
    for log in ("metrics.jsonl", "rounds.jsonl"):
        path = os.path.join(run_dir, log)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= rounds_done]
        with open(path, "w") as f:
            f.writelines(lines)


def model_hash(model: torch.nn.Module, params_only: bool = False) -> str:
    """sha256 of every parameter (and buffer), in state_dict order (a debug check of rank consistency)."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters()) if params_only else tensors_of(model)
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
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
            for name, p in w.model.named_parameters():
                full = w.slicer.full_tensors[name]
                if full.numel():  # the full model is current (allgather): the module holds its slice
                    ok &= torch.equal(p.detach(), read_slice(full, w.slicer.indices(loop.engine.partition, name)))
                master = safe_get_full_fp32_param(p)
                ok &= master is None or torch.equal(master.to(p.dtype).view_as(p), p.detach())
            self.file.write(json.dumps({"round": round_index, "master_matches": bool(ok),
                                        "master_copy": ds.master_copy(w.ds_engine)}) + "\n")

    def on_local_step_end(self, loop, worker, step, loss):
        sub = loop.engine.workers[loop.local_index[worker]].model
        self.file.write(json.dumps({"round": loop.state.round_index, "worker": worker, "step": step,
                                    "subnet": model_hash(sub, params_only=True)}) + "\n")

    def on_after_sync(self, loop, round_index, model):
        self.file.write(json.dumps({"round": round_index, "assembled": model_hash(model)}) + "\n")
        self.file.flush()

    def on_ticket_found(self, loop, detector, info):
        self.file.write(json.dumps({"round": info["round"], "ticket": detector}) + "\n")

    def on_fit_end(self, loop, metrics):
        self.file.close()


def start_tracker(accelerator, out_hp: OutputHparams, mode: str, config: dict, default_group: str,
                  job_type: str, name: str, run_dir: str, run_id: str | None = None) -> None:
    """A W&B run through Accelerate (main process only): one group per experiment, one job per stage.
    ``run_id`` names the W&B run (continued if it exists: a resumed pretraining)."""
    accelerator.trackers = []  # a finished stage's tracker must not receive the next stage's logs
    init = {"group": out_hp.wandb_group or default_group, "job_type": job_type, "name": name, "dir": run_dir,
            "mode": mode, "reinit": "finish_previous"}
    if run_id is not None:
        init.update(id=run_id, resume="allow")
    accelerator.init_trackers(out_hp.wandb_project, config=json.loads(json.dumps(config, default=list)),
                              init_kwargs={"wandb": init})


def tracker_mode(out_hp: OutputHparams) -> str:
    """The W&B mode of the run ("disabled" without the tracker); refuses online without credentials."""
    if out_hp.tracker != "wandb":
        return "disabled"
    try:
        mode = resolve_wandb_mode(out_hp.wandb_mode)
    except TrackingError as exc:
        raise ConfigError(str(exc)) from None
    os.environ.setdefault("WANDB_SILENT", "true")  # the run's own lines say where things are
    return mode


def start_accelerator(out_hp: OutputHparams, wandb: bool, collective_timeout: float = 1800.0):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = out_hp.cpu or not torch.cuda.is_available()
    check_mixed_precision(out_hp.mixed_precision, "cpu" if cpu else "cuda")
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))
    accelerator = Accelerator(cpu=cpu, mixed_precision=out_hp.mixed_precision,
                              log_with="wandb" if wandb else None, kwargs_handlers=[timeout])
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"WORLD_SIZE={expected} but Accelerate started {accelerator.num_processes} process(es) with no "
            "common process group; on CPU launch with `torchrun --nproc_per_node N` or "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`")
    return accelerator


def deepspeed_from_launcher(ds_hp: DeepSpeedHparams | None) -> DeepSpeedHparams | None:
    """``accelerate launch --use_deepspeed --deepspeed_config_file F`` turns on the DeepSpeed path with F.

    Accelerate cannot hand DeepSpeed an mpu (it calls ``deepspeed.initialize`` itself in ``prepare``), so
    loft_ext never lets it prepare the model: Accelerate starts the processes and owns the device, and
    loft_ext builds each worker's engine with the LoFT mpu from the same config file."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("true", "1"):
        return ds_hp
    ds_hp = ds_hp or DeepSpeedHparams()
    launched = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not launched:
        raise ConfigError("accelerate launch --use_deepspeed needs --deepspeed_config_file ds_configs/<config>.json: "
                          "loft_ext builds the engines itself (with the LoFT mpu) from an explicit config")
    if ds_hp.deepspeed_config and os.path.abspath(ds_hp.deepspeed_config) != os.path.abspath(launched):
        raise ConfigError(f"--deepspeed_config {ds_hp.deepspeed_config} conflicts with accelerate launch "
                          f"--deepspeed_config_file {launched}; pass one of them")
    return dataclasses.replace(ds_hp, deepspeed=True, deepspeed_config=launched)


def check_mixed_precision(mixed_precision: str, device_type: str, bf16_supported: bool | None = None) -> None:
    """Refuse bf16 on a GPU without bf16 support (pre-Ampere) instead of failing inside a kernel."""
    if mixed_precision != "bf16" or device_type != "cuda":
        return
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if not bf16_supported:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
        raise ConfigError(f"--mixed_precision bf16 needs a GPU with bf16 support (compute capability >= 8.0); "
                          f"{name} has none: use --mixed_precision no")


def _plugins(det_hp: DetectorHparams, out_hp: OutputHparams, main: bool, print_fn, run_dir: str,
             rank: int) -> list[Plugin]:
    """The run's plugins, in the order they see each event (recorders before the rules that read them)."""
    plugins: list[Plugin] = [Progress(print_fn)] if main else []
    if det_hp.distance_layers != "none":
        recorder = FilterDistance(det_hp.distance_layers, det_hp.distance_every)
        plugins += [recorder, DistanceStop(recorder, det_hp.distance_window, det_hp.distance_eps,
                                           det_hp.distance_stop)]
    if det_hp.earlybird:
        plugins.append(EarlyBird(det_hp.earlybird_ratio, det_hp.earlybird_every, stop=det_hp.earlybird_stop))
    if out_hp.debug_hashes:
        plugins.append(DebugHashes(os.path.join(run_dir, f"hashes-rank{rank}.jsonl")))
    return plugins


class SaveWeights(Plugin):
    """Saves the assembled model after round k (the rewinding point of lottery-ticket training)."""

    name = "save_weights"

    def __init__(self, round_number: int, path: str, main: bool):
        self.round_number, self.path, self.main = round_number, path, main

    def wants_model(self, loop, round_index, epoch_end):
        return round_index + 1 == self.round_number

    def on_after_sync(self, loop, round_index, model):
        if model is not None and self.main and round_index + 1 == self.round_number:
            save_weights(model, self.path)


def save_weights(model: torch.nn.Module, path: str) -> None:
    """A state_dict as safetensors (loading it never executes pickled code)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


def communication_report(engine: LoFTEngine, model, rounds: int, steps: int, elem: int) -> dict:
    """Measured bytes per phase next to the analytic count for the same run, strategy and grid layout
    (both split into intra-node and inter-node bytes)."""
    grid, plan = engine.grid, engine.plan
    copies = 1 if engine.optimizer_state == "carry" else 0  # SGD momentum: one state tensor per param
    strategy = "allgather" if isinstance(engine.strategy, AllGatherSync) else "alltoall"
    layout = grid.layout or plan_layout([0] * grid.world_size, grid.workers)
    counted = analytic.rank_bytes(model, plan, layout, grid.rank, strategy, rounds, steps, elem, copies,
                                  draw=engine.draw)
    return {
        "rank": grid.rank, "worker": grid.filter_index, "replica": grid.data_index, "workers": grid.workers,
        "replicas": grid.replicas, "strategy": engine.strategy.__class__.__name__, "rounds": rounds,
        "node": layout.nodes[grid.rank], "nodes": layout.nodes, "grid_order": layout.order,
        "measured": engine.comm.totals(), "analytic": counted,
    }


def run_pretrain(model_hp: ModelHparams, data_hp: DataHparams, loft_hp: LoftHparams,
                 train_hp: TrainHparams, det_hp: DetectorHparams, out_hp: OutputHparams,
                 print_fn=print, accelerator=None, rewind_round: int = 0,
                 ds_hp: DeepSpeedHparams | None = None, ckpt_hp: CheckpointHparams | None = None,
                 data: DataBundle | None = None) -> dict:
    """LoFT (or dense) pretraining with plugins; returns summary.json's content plus ``run_dir``.
    ``data``: the data set of ``data_hp`` when the caller has loaded it already.

    Saves ``init.safetensors`` (the initial weights), ``model.safetensors`` (the assembled model at the
    end) and, with ``rewind_round`` > 0, ``round_<k>.safetensors`` (the assembled model after round k).
    """
    validate(model_hp, data_hp, loft_hp, train_hp, det_hp)
    ckpt_hp = ckpt_hp or CheckpointHparams()
    validate_checkpointing(ckpt_hp)
    if out_hp.data_workers < 0:
        raise ConfigError(f"--data_workers must be >= 0 (got {out_hp.data_workers})")
    if loft_hp.method == "earlybird":  # dense pretraining that the Early-Bird detector ends
        det_hp = dataclasses.replace(det_hp, earlybird=True, earlybird_stop=True)
    wandb_mode = tracker_mode(out_hp)
    dense = loft_hp.method in ("dense", "earlybird")
    workers = 1 if dense else loft_hp.workers
    optimizer_state = "carry" if dense else loft_hp.optimizer_state
    accelerator = accelerator or start_accelerator(out_hp, wandb=wandb_mode != "disabled",
                                                   collective_timeout=ckpt_hp.collective_timeout)
    world, main = accelerator.num_processes, accelerator.is_main_process
    try:
        replicas = check_world(world, workers) if world > 1 else 1
    except GridError as exc:
        raise ConfigError(str(exc)) from None
    say = print_fn if main else (lambda *a, **k: None)
    ds_hp = deepspeed_from_launcher(ds_hp)
    ds_cfg = None
    if ds_hp is not None and ds_hp.deepspeed:
        try:  # the config is checked first, so its mistakes are reported even in a single process
            ds_cfg = ds.load_ds_config(ds_hp.deepspeed_config, data_hp.batch_size, replicas if world > 1 else None)
        except DeepSpeedConfigError as exc:
            raise ConfigError(str(exc)) from None
        if out_hp.channels_last:  # DeepSpeed broadcasts each parameter as a byte view (needs stride(-1) == 1)
            raise ConfigError("--channels_last does not work with --deepspeed: DeepSpeed views every parameter "
                              "as bytes to broadcast it, which needs the default layout; drop --channels_last")
        if world == 1:
            raise ConfigError("--deepspeed needs one process per worker: launch with "
                              f"`deepspeed --num_gpus {workers} recipes/loft_timm.py --deepspeed ...`")
        if optimizer_state == "carry" and ds_cfg.get("zero_optimization", {}).get("stage", 0) > 0:
            raise ConfigError("--optimizer_state carry needs zero_optimization.stage 0 under DeepSpeed (ZeRO "
                              "keeps optimizer state in flat partitions); use reset or a stage-0 config")
        data_hp = dataclasses.replace(data_hp, batch_size=ds_cfg["train_micro_batch_size_per_gpu"])
    data = data or load_dataset(data_hp.dataset, data_hp.data_dir, data_hp.image_size or None, data_hp.augment)
    # everything that can refuse the run happens before the run directory is touched
    torch.manual_seed(train_hp.seed)
    model = create_model(model_hp.model, data.num_classes, data.in_chans)
    input_shape = (1, data.in_chans, data.image_size, data.image_size)
    plan = make_plan(model, workers, model_hp.preset, input_shape, model_hp.model)
    if det_hp.earlybird and not any(isinstance(m, torch.nn.BatchNorm2d) and m.affine for m in model.modules()):
        if det_hp.earlybird_stop:  # --method earlybird or --earlybird_stop: the detector is the point
            raise ConfigError(f"Early-Bird ranks BatchNorm2d scales and {model_hp.model} has none; choose a model "
                              "with BatchNorm (e.g. resnet18) or another --method / drop --earlybird_stop")
        say(f"note: {model_hp.model} has no BatchNorm2d, so the Early-Bird detector is off for this run")
        det_hp = dataclasses.replace(det_hp, earlybird=False)
    hashed = (model_hp, data_hp, loft_hp, train_hp, det_hp)
    # S simulated workers and S processes give the same run; D replicas change the batch, so D is named
    run_id = hparams_hash(*hashed)
    if ds_cfg is not None:  # clipping or precision in the config can change the result
        run_id = hashlib.sha256(f"{run_id}-{json.dumps(ds_cfg, sort_keys=True)}-{ds_hp.ds_clip}".encode()
                                ).hexdigest()[:12]
    if replicas > 1:
        run_id = hashlib.sha256(f"{run_id}-replicas{replicas}".encode()).hexdigest()[:12]
    name = f"{model_hp.model}-{run_id}"
    run_dir = os.path.join(out_hp.output_dir, name)
    config = {type(h).__name__: h.to_dict() for h in hashed}
    identity = {"run": name, "model": model_hp.model, "dataset": data_hp.dataset, "method": loft_hp.method,
                "workers": workers, "replicas": replicas, "world": world, "preset": model_hp.preset,
                "sync": loft_hp.sync, "optimizer_state": optimizer_state, "deepspeed": ds_cfg is not None,
                "hparams": json.loads(json.dumps(config, default=list))}
    resume_from, start_round = None, 0
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        try:  # checked before the run directory is touched
            resume_from = checkpointing.find_checkpoint(ckpt_hp.resume, run_dir)
            if resume_from is not None:
                checkpointing.check_identity(resume_from, identity)
                start_round = checkpointing.load_model(resume_from, model)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    if main:
        prepare_run_dir(out_hp.output_dir, name, out_hp.force, ckpt_hp.resume)
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            truncate_logs(run_dir, start_round)  # a fresh start drops an earlier attempt's lines
    grid = build_grid(workers, out_hp.grid_order, ckpt_hp.collective_timeout) if world > 1 else None
    if grid is not None:
        dist.barrier()  # the main process has prepared (or moved) the run directory
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        say(f"pretraining {run_dir} already finished (test acc {100 * summary['test_acc']:.2f}%); "
            "pass --force to train it again")
        return {**summary, "run_dir": run_dir, "skipped": True}
    if main and resume_from is None:
        save_weights(model, os.path.join(run_dir, "init.safetensors"))

    t_start = time.time()
    device = accelerator.device
    memory_format = torch.channels_last if out_hp.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)  # sub-networks keep each tensor's layout (narrow_model)
    full_params = sum(p.numel() for p in model.parameters())  # before alltoall frees the split tensors
    fractions = " ".join(f"{plan.worker_numel(model, s) / full_params:.3f}" for s in range(plan.workers))
    elem = next(model.parameters()).element_size()

    def make_optimizer(params):
        return torch.optim.SGD(params, lr=train_hp.lr, momentum=train_hp.momentum,
                               weight_decay=train_hp.weight_decay)

    engine = LoFTEngine(model, plan, make_optimizer, train_hp.seed, optimizer_state,
                        grid=grid, strategy=loft_hp.sync, start_round=start_round)
    for w in engine.workers:
        w.autocast = accelerator.autocast
        w.memory_format = memory_format
        if ds_cfg is not None:
            w.ds_engine, _, w.clip_norm = ds.initialize(w.model, w.optimizer, ds_cfg, LoftMPU(grid), ds_hp.ds_clip)
            w.grad_sync = None  # DeepSpeed all-reduces gradients over the mpu's data group
            w.after_load = (lambda e=w.ds_engine: ds.push_values(e))
    d_index = grid.data_index if grid else 0
    streams = {w.index: BatchStream(data.train, data_hp.batch_size, w.index, workers,
                                    data_hp.data_order, train_hp.seed, num_workers=out_hp.data_workers,
                                    replica=d_index, replicas=replicas, device=device,
                                    augmented=data.augmented) for w in engine.workers}
    steps_per_epoch = next(iter(streams.values())).steps_per_epoch
    rounds_per_epoch = max(1, math.ceil(steps_per_epoch / loft_hp.local_steps))
    rounds = train_hp.rounds or train_hp.epochs * rounds_per_epoch
    test_loader = DataLoader(data.test, batch_size=data_hp.eval_batch_size)
    recal_loader = DataLoader(data.train, batch_size=data_hp.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(train_hp.seed))

    where = (f"{world} processes = S={workers} x D={replicas} ({loft_hp.sync}, "
             f"{dist.get_backend()}{', DeepSpeed' if ds_cfg else ''})" if grid else "1 process, workers simulated")
    say(f"{model_hp.model} on {data.name} ({loft_hp.method}): {full_params / 1e6:.2f}M params; "
        f"{len(plan.split)} split groups ({model_hp.preset}); per-worker parameter fraction {fractions}; "
        f"S={workers} L={loft_hp.local_steps} rounds={rounds} ({rounds_per_epoch}/epoch); {where}; "
        f"{'channels_last; ' if out_hp.channels_last else ''}run dir {run_dir}"
        f"{f'; grid on {grid.layout.describe()}' if grid else ''}", flush=True)
    if resume_from is not None:
        say(f"resuming from {resume_from} (after round {start_round} of {rounds})", flush=True)
    elif ckpt_hp.resume:
        say(f"--resume {ckpt_hp.resume}: no complete checkpoint in {run_dir}, starting from round 0", flush=True)
    if main:
        with open(os.path.join(run_dir, "hparams.json"), "w") as f:
            json.dump(config, f, indent=1, default=list)
        with open(os.path.join(run_dir, "plan.json"), "w") as f:
            f.write(plan.to_json())
    wandb = wandb_mode != "disabled"
    if wandb:
        run_id = None
        if main:
            run_id, continued = wandb_run_id(run_dir, resume=resume_from is not None)
            if continued:
                say(f"W&B: continuing run {run_id} (offline segments: `wandb sync {run_dir}/wandb/offline-run-*`)",
                    flush=True)
        start_tracker(accelerator, out_hp, wandb_mode, config, f"{model_hp.model}-{data.name}", "pretrain",
                      name, run_dir, run_id)
    logger = RunLogger(run_dir if main else None, accelerator, wandb=wandb)
    rank = grid.rank if grid else 0
    plugins = _plugins(det_hp, out_hp, main, print_fn, run_dir, rank)
    if rewind_round > 0:
        plugins.append(SaveWeights(rewind_round, os.path.join(run_dir, f"round_{rewind_round}.safetensors"), main))
    preemption = Preemption(say)
    every = rounds_per_epoch if ckpt_hp.checkpoint_every == 0 else max(ckpt_hp.checkpoint_every, 0)
    generators = {"recalibration": recal_loader.generator}
    checkpointer = Checkpointer(CheckpointStore(os.path.join(run_dir, CHECKPOINT_DIR), ckpt_hp.keep_checkpoints),
                                every, identity, streams, generators, rank, main, say)
    plugins += [NonFiniteGuard(), preemption, checkpointer]  # the checkpointer last: it saves the others' state

    loop = LoFTLoop(engine, [streams.get(s) for s in range(workers)], test_loader, rounds, loft_hp.local_steps,
                    lambda r: lr_at(r, rounds, train_hp.lr, train_hp.lr_schedule,
                                    train_hp.lr_milestones, train_hp.lr_gamma),
                    plugins=plugins, rounds_per_epoch=rounds_per_epoch, recalibrate=recal_loader,
                    recalibrate_batches=train_hp.bn_recalibration_batches, logger=logger)
    if resume_from is not None:
        try:
            checkpointing.restore(resume_from, loop, streams, generators, rank)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    try:
        metrics = loop.fit()
    except TrainingFailure as exc:
        logger.close()
        raise TrainingFailure(f"{exc}. Last good checkpoint: {checkpointer.store.latest() or 'none'}") from None
    except RuntimeError as exc:  # a collective failed: a peer died, hung past the timeout, or lost its link
        if grid is None:
            raise
        logger.close()
        latest = checkpointer.store.latest()
        raise TrainingFailure(
            f"rank {rank}: a collective failed in round {loop.state.round_index + 1} "
            f"({str(exc).strip().splitlines()[0][:200]}); another rank probably died or hung longer than "
            f"--collective_timeout {ckpt_hp.collective_timeout:g}s. Last complete checkpoint: {latest or 'none'}; "
            "rerun the same command with --resume latest") from exc
    if loop.preempted:
        logger.close()
        engine.release()
        if grid is not None:
            dist.barrier()
        raise Preempted(preemption.received or signal.SIGTERM, loop.state.round_index, checkpointer.last)
    final = engine.assembled()  # the analytic count below reads the full tensors' sizes
    if grid is not None:
        report = communication_report(engine, model, loop.state.round_index,
                                      loop.state.round_index * loft_hp.local_steps, elem)
        with open(os.path.join(run_dir, f"comm-rank{grid.rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
        m, a = report["measured"].get("sync", {}), report["analytic"]["sync"]

        def inter(counts):
            return sum(counts.get(p, {}).get("inter_node_bytes_sent", 0.0) for p in ("sync", "dp_grad"))
        say(f"communication per rank (rank 0), sync: measured {m.get('bytes_sent', 0) / 2**20:.2f} MiB sent "
            f"in {m.get('calls', 0)} calls, analytic {a['bytes_sent'] / 2**20:.2f} MiB; inter-node (sync + dp_grad) "
            f"measured {inter(report['measured']) / 2**20:.2f} MiB, analytic {inter(report['analytic']) / 2**20:.2f} "
            f"MiB; all phases in {run_dir}/comm-rank*.json", flush=True)
    sync = engine.comm.counters.get("sync")
    summary = {**metrics, "tickets": loop.state.tickets, "stopped_early": bool(loop.stop_reasons),
               "rounds_done": loop.state.round_index, "epochs_done": loop.state.round_index / rounds_per_epoch,
               "workers": workers, "local_steps": loft_hp.local_steps, "replicas": replicas,
               "method": loft_hp.method, "sync_bytes_sent": sync.sent if sync else 0.0,
               "wall_s": time.time() - t_start}
    if main:
        save_weights(final, os.path.join(run_dir, "model.safetensors"))
        write_json_atomic(os.path.join(run_dir, "summary.json"), summary)  # its presence marks the run finished
    engine.release()
    logger.close()
    if grid is not None:
        dist.barrier()  # nobody exits (and tears the group down) while another rank still reads
    return {**summary, "run_dir": run_dir, "skipped": False}


__all__ = ["PRETRAIN_HPARAMS", "ConfigError", "DataError", "run_pretrain", "start_accelerator"]
