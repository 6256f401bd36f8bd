"""The recipe's hparams (one dataclass per flag group; every field is a --flag) and their validation."""
from __future__ import annotations

from dataclasses import dataclass

from ..data import DATA_ORDERS, DATASETS
from ..errors import ConfigError
from ..images import BAD_IMAGE_POLICIES
from ..hparams import Hparams, field
from ..parallel.ds import CLIP_MODES
from ..parallel.grid import GRID_ORDERS
from ..parallel.replicas import REPLICA_MODES
from ..parallel.sync import OPTIMIZER_STATE_MODES, STRATEGIES
from ..partition.plan import DEFAULT_PRESET, PRESET_HELP, PRESETS


METHODS = ("loft", "dense", "earlybird", "random")


@dataclass
class ModelHparams(Hparams):
    """Model"""

    model: str = field("resnet18", "timm model name, created with pretrained=False")
    preset: str = field(DEFAULT_PRESET, PRESET_HELP, PRESETS)


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
    bad_images: str = field("refuse", "imagefolder files that cannot be read as images: refuse (a scan before "
                            "training lists them, exit 2), skip (the scan leaves them out, counted as "
                            "images_skipped) or replace (no scan); at run time a file that fails to decode is "
                            "always replaced by another sample (samples_replaced)", BAD_IMAGE_POLICIES)


@dataclass
class LoftHparams(Hparams):
    """LoFT"""

    workers: int = field(2, "S: filter workers; each trains a 1/S-wide sub-network of the split groups")
    local_steps: int = field(4, "L: local steps per worker between two syncs (one round)")
    optimizer_state: str = field("carry", "carry: momentum kept in a full-size buffer sliced and written back like "
                                 "the weights (twice reset's sync bytes; with presets one_dim and one_dim_flops "
                                 "the LoFT model matches dense: docs/results.md, 'Pretraining quality'); reset: "
                                 "momentum cleared each round (the paper)", OPTIMIZER_STATE_MODES)
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
    distance_window_epochs: float = field(
        0.0, "filter-distance stop rule: compare with every record of the last E epochs instead (> 0 replaces "
        "--distance_window; use it when records are frequent)", legacy=0.0)
    distance_eps: float = field(0.1, "filter-distance stop rule: threshold on the normalised distance")
    distance_lr_below: float = field(
        1.0, "filter-distance stop rule: check a record only when its round's learning rate is at most this "
        "fraction of the highest so far (0.5: after a step schedule's first drop, past the middle of a cosine "
        "one; 1 = always)", legacy=1.0)
    distance_stop: bool = field(False, "stop pretraining when the filter-distance rule fires (else report)")
    earlybird: bool = field(True, "run the Early-Bird detector (BN-gamma channel masks)")
    earlybird_ratio: float = field(0.5, "Early-Bird pruning ratio p of the BN-gamma mask")
    earlybird_every: int = field(0, "Early-Bird check every k rounds; 0 = at every epoch end")
    earlybird_stop: bool = field(False, "stop pretraining when Early-Bird fires (else report)")
    plugins: str = field("", "comma-separated names of extra plugins (registered with loft_ext.register_plugin "
                         "or installed under the entry-point group loft_ext.plugins), created with no arguments")


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
    finished_run_checkpoints: str = field("keep", "the resume checkpoints once the run has finished "
                                          "(summary.json written): keep them (to inspect or extend the run) or "
                                          "delete them (sweeps of many runs: the model and logs stay)",
                                          ("keep", "delete"))
    resume: str = field("", "continue an unfinished run: 'latest' (the newest complete checkpoint in the run "
                        "directory; a fresh start if there is none) or a checkpoint directory")
    collective_timeout: float = field(1800.0, "seconds any collective may wait; a rank that died or hangs ends "
                                      "the job after at most this long")


@dataclass
class OutputHparams(Hparams):
    """Output and runtime"""

    output_dir: str = field("runs", "runs are stored in <output_dir>/<model>-<hash of hparams>/")
    force: bool = field(False, "retrain a run that already finished, restart an unfinished one that has "
                        "checkpoints, or retrain one whose plan.json splits other groups than this code's plan "
                        "(the old directory is kept, renamed)")
    mixed_precision: str = field("no", "autocast for the workers' forward passes (bf16 on GPU)", ("no", "bf16"))
    channels_last: bool = field(False, "channels_last memory format for conv weights and input batches, in "
                                "pretraining and fine-tuning (timm's --channels-last: faster convolutions with "
                                "bf16 on recent GPUs)")
    cpu: bool = field(False, "run on CPU even when GPUs are present (gloo instead of NCCL)")
    grid_order: str = field("auto", "placement of the S x D grid on the nodes: replicas-within-node (a worker's D "
                            "replicas on one node; the filter axis crosses nodes), workers-within-node (the "
                            "other way round) or auto (replicas-within-node on more than one node); an execution "
                            "choice, not part of the run's hash", GRID_ORDERS)
    replicas: str = field("ddp", "how the D replicas of a worker train when S x D processes are launched: ddp (each "
                          "rank holds the worker's whole sub-network; gradients all-reduced) or fsdp (the sub-network "
                          "sharded with FSDP2 over the D ranks: parameters, gradients and optimizer state 1/D per "
                          "rank, carried optimizer state too; docs/fsdp.md); an execution choice, not part of the "
                          "run's hash; no-op with D = 1", REPLICA_MODES)
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
        (det_hp.distance_window_epochs >= 0,
         f"--distance_window_epochs must be >= 0 (got {det_hp.distance_window_epochs}; 0 = count records)"),
        (det_hp.distance_eps > 0, f"--distance_eps must be > 0 (got {det_hp.distance_eps})"),
        (0 < det_hp.distance_lr_below <= 1,
         f"--distance_lr_below must be in (0, 1], a fraction of the highest learning rate (got "
         f"{det_hp.distance_lr_below}; 1 = check every record)"),
        (det_hp.distance_lr_below == 1 or train_hp.lr_schedule != "constant" or det_hp.distance_layers == "none",
         f"--distance_lr_below {det_hp.distance_lr_below} with --lr_schedule constant: the learning rate never "
         "falls, so the filter-distance rule would never be checked; use --distance_lr_below 1 or a step or cosine "
         "schedule"),
        (0 <= det_hp.earlybird_ratio < 1, f"--earlybird_ratio must be in [0, 1) (got {det_hp.earlybird_ratio})"),
        (det_hp.earlybird_every >= 0, f"--earlybird_every must be >= 0 (got {det_hp.earlybird_every})"),
        (loft_hp.workers >= 1, f"--workers must be >= 1 (got {loft_hp.workers})"),
        (loft_hp.local_steps >= 1, f"--local_steps must be >= 1 (got {loft_hp.local_steps})"),
        (data_hp.batch_size >= 1, f"--batch_size must be >= 1 (got {data_hp.batch_size})"),
        (data_hp.eval_batch_size >= 1, f"--eval_batch_size must be >= 1 (got {data_hp.eval_batch_size})"),
        (train_hp.rounds >= 0, f"--rounds must be >= 0 (got {train_hp.rounds}; 0 = train for --epochs)"),
        (train_hp.epochs >= 0, f"--epochs must be >= 0 (got {train_hp.epochs})"),
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
