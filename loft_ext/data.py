"""Data sets that need no download, and each worker's order over them.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), scaled up bilinearly to
  ``image_size`` (default 32) so that a timm CNN's five stride-2 stages still see a 1x1 map at the end;
  a fixed stratified 80/20 train/test split.
- ``cifar10`` / ``cifar100`` / ``fashion_mnist``: torchvision's on-disk layout under ``--data_dir``
  (``cifar-10-batches-py/``, ``cifar-100-python/``, ``FashionMNIST/raw/``); never downloaded.
- ``imagefolder``: ``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*`` (or ``test/``), the
  same class folders in both, none empty; unreadable image files are refused, skipped or replaced
  (``--bad_images``, loft_ext/images.py).

Worker orders (``data_order``): ``own-shuffle`` gives every worker its own shuffled order of the whole
training set each epoch (the release); ``shard`` gives worker s a fixed disjoint 1/S of it, reshuffled
each epoch. Orders are pure functions of (seed, worker, epoch).

Random augmentation (CIFAR, imagefolder) is seeded per sample from (seed, worker, epoch, index): a
training batch is the same whether the workers are simulated in one process or run as S processes,
whatever the number of loader processes (``--data_workers``), and after a resume.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from loft_ext.errors import ConfigError
from loft_ext.images import (BAD_IMAGE_POLICIES, ReplaceUnreadable, check_layout, check_not_empty, drop_samples,
                             list_bad, scan_images)

DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist", "imagefolder")
DATA_ORDERS = ("own-shuffle", "shard")


class DataError(ConfigError):
    """A data set that is missing or malformed; the message names the expected layout."""


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    name: str
    augmented: bool = False  # the training transform draws random numbers
    images_skipped: int = 0  # unreadable files left out (--bad_images skip)


class SeededSamples(Dataset):
    """``dataset[index]`` with the torch RNG seeded by the sampler's per-sample seed for the transform
    (torchvision's transforms draw from the global torch RNG; its state outside is left untouched).
    Keys are ``(index, seed)`` pairs from :class:`WorkerSampler` with ``seeded=True``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _generator(*seeds: int) -> torch.Generator:
    seq = np.random.SeedSequence(list(seeds))
    return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))


def load_digits_dataset(image_size: int = 32) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return DataBundle(TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test]),
                      10, 1, image_size, "digits")


def _require_dir(path: str, dataset: str, layout: str) -> None:
    if not path:
        raise DataError(f"--dataset {dataset} needs --data_dir: a directory holding {layout} "
                        "(loft_ext never downloads data)")
    if not os.path.isdir(path):
        raise DataError(f"data directory {path!r} for --dataset {dataset} does not exist; "
                        f"expected a directory holding {layout} (loft_ext never downloads data)")


def load_dataset(name: str, data_dir: str = "", image_size: int | None = None,
                 augment: bool = True, bad_images: str = "refuse") -> DataBundle:
    """Build the train and test sets of ``name``; see the module docstring for the layouts.
    ``bad_images`` (imagefolder): what to do with files that cannot be read as images (loft_ext/images.py)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits_dataset(image_size or 32)

    import torchvision.datasets as tvd
    import torchvision.transforms as T

    if name in ("cifar10", "cifar100"):
        cls, folder, classes = ((tvd.CIFAR10, "cifar-10-batches-py", 10) if name == "cifar10"
                                else (tvd.CIFAR100, "cifar-100-python", 100))
        _require_dir(data_dir, name, f"{folder}/ (torchvision's CIFAR layout)")
        size = image_size or 32
        norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        base = [T.Resize(size)] if size != 32 else []
        aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if augment else []
        try:
            train = cls(data_dir, train=True, download=False, transform=T.Compose(base + aug + [T.ToTensor(), norm]))
            test = cls(data_dir, train=False, download=False, transform=T.Compose(base + [T.ToTensor(), norm]))
        except RuntimeError as exc:
            raise DataError(f"{data_dir!r} does not hold {folder}/ in torchvision's CIFAR layout ({exc})") from None
        return DataBundle(train, test, classes, 3, size, name, augmented=augment)
    if name == "fashion_mnist":
        _require_dir(data_dir, name, "FashionMNIST/raw/*-ubyte(.gz) (torchvision's layout)")
        size = image_size or 28
        tf = T.Compose(([T.Resize(size)] if size != 28 else []) + [T.ToTensor(), T.Normalize((0.2860,), (0.3530,))])
        try:
            train = tvd.FashionMNIST(data_dir, train=True, download=False, transform=tf)
            test = tvd.FashionMNIST(data_dir, train=False, download=False, transform=tf)
        except RuntimeError as exc:
            raise DataError(f"{data_dir!r} does not hold FashionMNIST/raw/ in torchvision's layout ({exc})") from None
        return DataBundle(train, test, 10, 1, size, name)
    # imagefolder
    _require_dir(data_dir, name, "train/<class>/* and val/<class>/* (or test/)")
    size = image_size or 224
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    split_dirs = [d for d in ("val", "test") if os.path.isdir(os.path.join(data_dir, d))]
    if not os.path.isdir(os.path.join(data_dir, "train")) or not split_dirs:
        raise DataError(f"{data_dir!r} must hold train/<class>/* and val/<class>/* (or test/) for --dataset imagefolder")
    if bad_images not in BAD_IMAGE_POLICIES:
        raise DataError(f"unknown --bad_images {bad_images!r}; choose one of {', '.join(BAD_IMAGE_POLICIES)}")
    # defects are refused before anything runs (loft_ext/images.py): class folders, then image files
    check_layout(data_dir, ["train", split_dirs[0]], DataError)
    aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else [T.Resize(size), T.CenterCrop(size)]
    train = tvd.ImageFolder(os.path.join(data_dir, "train"), transform=T.Compose(aug + [T.ToTensor(), norm]),
                            allow_empty=True)
    test = tvd.ImageFolder(os.path.join(data_dir, split_dirs[0]),
                           transform=T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm]),
                           allow_empty=True)
    check_not_empty({"train": train, split_dirs[0]: test}, data_dir, DataError)
    skipped = 0
    if bad_images != "replace":
        bad = scan_images([p for p, _ in train.samples] + [p for p, _ in test.samples])
        if bad and bad_images == "refuse":
            raise DataError(f"{len(bad)} of {len(train) + len(test)} image files under {data_dir} cannot be read: "
                            f"{list_bad(bad, data_dir)}; remove or replace them, or pass --bad_images skip "
                            "(leave them out) or replace (draw another sample when one fails)")
        skipped = drop_samples(train, bad) + drop_samples(test, bad)
        check_not_empty({"train": train, split_dirs[0]: test}, data_dir, DataError)
    return DataBundle(ReplaceUnreadable(train), ReplaceUnreadable(test, "test"), len(train.classes), 3, size, name,
                      augmented=augment, images_skipped=skipped)


def data_health(data: DataBundle) -> dict:
    """Unreadable images of the run: left out by the scan (``--bad_images skip``), and replaced at run
    time (counted in this process, across its DataLoader workers)."""
    replaced = sum(getattr(d, "replaced", 0) for d in (data.train, data.test))
    return {"images_skipped": data.images_skipped, "samples_replaced": replaced}


class WorkerSampler(Sampler[int]):
    """Worker ``worker``'s order over a data set of ``n`` samples for the current epoch.

    With D data-parallel replicas of the worker, replica d takes positions d, d+D, ... of that order,
    so the replicas of one worker see disjoint samples and together the worker's whole order.
    """

    def __init__(self, n: int, worker: int, workers: int, order: str = "own-shuffle", seed: int = 0,
                 replica: int = 0, replicas: int = 1, seeded: bool = False):
        if order not in DATA_ORDERS:
            raise DataError(f"unknown data order {order!r}; choose one of {', '.join(DATA_ORDERS)}")
        self.n, self.worker, self.workers, self.order, self.seed = n, worker, workers, order, seed
        self.replica, self.replicas = replica, replicas
        self.seeded = seeded  # yield (index, per-sample seed) for SeededSamples
        self.epoch = 0
        self.skip = 0  # positions of the current epoch already consumed (a resumed run), used once
        if order == "shard":
            self.shard = torch.randperm(n, generator=_generator(seed, 7919))[worker::workers]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        total = len(self.shard) if self.order == "shard" else self.n
        return len(range(self.replica, total, self.replicas))

    def __iter__(self):
        g = _generator(self.seed, self.worker, self.epoch)
        if self.order == "shard":
            order = self.shard[torch.randperm(len(self.shard), generator=g)]
        else:
            order = torch.randperm(self.n, generator=g)
        skip, self.skip = self.skip, 0
        mine = order[self.replica::self.replicas][skip:].tolist()
        if not self.seeded:
            return iter(mine)
        base = _generator(self.seed, self.worker, self.epoch, 104729).initial_seed()
        return iter([(i, (base + i * 0x9E3779B97F4A7C15) % 2 ** 63) for i in mine])


class BatchStream:
    """An endless stream of one worker's training batches, epoch after epoch (last partial batch dropped)."""

    def __init__(self, dataset: Dataset, batch_size: int, worker: int = 0, workers: int = 1,
                 order: str = "own-shuffle", seed: int = 0, num_workers: int = 0,
                 replica: int = 0, replicas: int = 1, device: torch.device | str = "cpu",
                 augmented: bool = False):
        self.sampler = WorkerSampler(len(dataset), worker, workers, order, seed, replica, replicas,
                                     seeded=augmented)
        self.device = torch.device(device)
        if len(self.sampler) < batch_size:
            raise DataError(f"worker {worker} holds {len(self.sampler)} training samples, fewer than one "
                            f"batch of {batch_size}; lower --batch_size")
        self.loader = DataLoader(SeededSamples(dataset) if augmented else dataset, batch_size=batch_size,
                                 sampler=self.sampler, drop_last=True, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=self.device.type == "cuda")
        self.batch_size = batch_size
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already returned
        self._it = iter(self.loader)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def next(self):
        try:
            x, y = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.consumed = 0
            self.sampler.set_epoch(self.epoch)
            self._it = iter(self.loader)
            x, y = next(self._it)
        self.consumed += 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """The stream's position: orders are functions of (seed, worker, epoch), so this is all of it."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position, skipping consumed samples without loading them."""
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.consumed * self.batch_size
        self._it = iter(self.loader)
