"""Builds a LoFT pretraining run from hparams and stores it under a directory named by their hash."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..data import DATA_ORDERS, DATASETS, BatchStream, DataError, load_dataset
from ..hparams import Hparams, field, hparams_hash
from ..models import create_model
from ..partition.plan import PRESETS, make_plan
from .loft import OPTIMIZER_STATE_MODES, LoFTEngine
from .loop import Callback, LoFTLoop, lr_at


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
class OutputHparams(Hparams):
    """Output"""

    output_dir: str = field("runs", "runs are stored in <output_dir>/<model>-<hash of hparams>/")
    force: bool = field(False, "retrain a run that already finished (the old directory is kept, renamed)")


HPARAM_CLASSES = (ModelHparams, DataHparams, LoftHparams, TrainHparams, OutputHparams)


class ConfigError(ValueError):
    """Hparams that cannot work together; the message says which flag and what would work."""


def validate(model_hp, data_hp, loft_hp, train_hp) -> None:
    checks = [
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
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


class PrintProgress(Callback):
    """Prints one line per epoch: each worker's mean loss and the assembled model's test accuracy."""

    def __init__(self, print_fn=print):
        self.print = print_fn
        self.t0 = time.time()

    def on_epoch_end(self, loop, epoch, m):
        losses = " ".join(f"{x:.4f}" for x in m["worker_loss"])
        self.print(f"epoch {epoch:3d} round {m['round']:5d} lr {m['lr']:.4f} | worker loss {losses} | "
                   f"test acc {100 * m['test_acc']:.2f}% loss {m['test_loss']:.4f} | "
                   f"{time.time() - self.t0:.0f}s", flush=True)


class JsonlMetrics(Callback):
    """Appends every epoch's metrics to metrics.jsonl in the run directory."""

    def __init__(self, path: str):
        self.path = path

    def on_epoch_end(self, loop, epoch, m):
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")


def prepare_run_dir(output_dir: str, name: str, force: bool) -> tuple[str, bool]:
    """(run directory, already finished?). A finished run is never overwritten: with ``force`` it is
    renamed to <dir>.old-N first."""
    run_dir = os.path.join(output_dir, name)
    done = os.path.exists(os.path.join(run_dir, "summary.json"))
    if done and force:
        n = 1
        while os.path.exists(f"{run_dir}.old-{n}"):
            n += 1
        shutil.move(run_dir, f"{run_dir}.old-{n}")
        done = False
    if not done:
        try:
            os.makedirs(run_dir, exist_ok=True)
            for stale in ("metrics.jsonl",):
                if os.path.exists(os.path.join(run_dir, stale)):
                    os.remove(os.path.join(run_dir, stale))  # an unfinished attempt of the same run
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir!r} ({exc.strerror}); "
                              "pass a writable --output_dir") from None
    return run_dir, done


def run_pretrain(model_hp: ModelHparams, data_hp: DataHparams, loft_hp: LoftHparams,
                 train_hp: TrainHparams, out_hp: OutputHparams, print_fn=print) -> dict:
    """LoFT pretraining with S simulated workers; returns the final metrics (also in summary.json)."""
    validate(model_hp, data_hp, loft_hp, train_hp)
    data = load_dataset(data_hp.dataset, data_hp.data_dir, data_hp.image_size or None, data_hp.augment)
    # everything that can refuse the run happens before the run directory is touched
    torch.manual_seed(train_hp.seed)
    model = create_model(model_hp.model, data.num_classes, data.in_chans)
    input_shape = (1, data.in_chans, data.image_size, data.image_size)
    plan = make_plan(model, loft_hp.workers, model_hp.preset, input_shape, model_hp.model)
    name = f"{model_hp.model}-{hparams_hash(model_hp, data_hp, loft_hp, train_hp)}"
    run_dir, done = prepare_run_dir(out_hp.output_dir, name, out_hp.force)
    if done:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        print_fn(f"run {run_dir} already finished (test acc {100 * summary['test_acc']:.2f}%); "
                 "pass --force to train it again")
        return summary

    def make_optimizer(params):
        return torch.optim.SGD(params, lr=train_hp.lr, momentum=train_hp.momentum,
                               weight_decay=train_hp.weight_decay)

    engine = LoFTEngine(model, plan, make_optimizer, train_hp.seed, loft_hp.optimizer_state)
    streams = [BatchStream(data.train, data_hp.batch_size, s, loft_hp.workers, data_hp.data_order,
                           train_hp.seed) for s in range(loft_hp.workers)]
    rounds_per_epoch = max(1, math.ceil(streams[0].steps_per_epoch / loft_hp.local_steps))
    rounds = train_hp.rounds or train_hp.epochs * rounds_per_epoch
    test_loader = DataLoader(data.test, batch_size=data_hp.eval_batch_size)
    recal_loader = DataLoader(data.train, batch_size=data_hp.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(train_hp.seed))

    full_params = sum(p.numel() for p in model.parameters())
    fractions = " ".join(f"{plan.worker_numel(model, s) / full_params:.3f}" for s in range(plan.workers))
    print_fn(f"{model_hp.model} on {data.name}: {full_params / 1e6:.2f}M params; "
             f"{len(plan.split)} split groups ({model_hp.preset}); per-worker parameter fraction {fractions}; "
             f"S={loft_hp.workers} L={loft_hp.local_steps} rounds={rounds} ({rounds_per_epoch}/epoch); "
             f"run dir {run_dir}", flush=True)
    with open(os.path.join(run_dir, "hparams.json"), "w") as f:
        json.dump({type(h).__name__: h.to_dict() for h in (model_hp, data_hp, loft_hp, train_hp)}, f,
                  indent=1, default=list)
    with open(os.path.join(run_dir, "plan.json"), "w") as f:
        f.write(plan.to_json())

    loop = LoFTLoop(engine, streams, test_loader, rounds, loft_hp.local_steps,
                    lambda r: lr_at(r, rounds, train_hp.lr, train_hp.lr_schedule,
                                    train_hp.lr_milestones, train_hp.lr_gamma),
                    callbacks=[PrintProgress(print_fn), JsonlMetrics(os.path.join(run_dir, "metrics.jsonl"))],
                    rounds_per_epoch=rounds_per_epoch, recalibrate=recal_loader,
                    recalibrate_batches=train_hp.bn_recalibration_batches)
    metrics = loop.fit()
    torch.save(model.state_dict(), os.path.join(run_dir, "model.pt"))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


__all__ = ["HPARAM_CLASSES", "ConfigError", "DataError", "run_pretrain"] + [c.__name__ for c in HPARAM_CLASSES]
