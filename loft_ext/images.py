"""ImageFolder data sets a user brings: layout checks, a fast scan for unreadable files, and a data set
wrapper that never lets one unreadable file end a run (docs/reliability.md, "Bad data").

- :func:`check_layout`: before anything is read, ``train/`` and ``val/`` must hold class folders, the
  same ones (labels are the sorted folder names, so a class missing from one split shifts every label
  after it), and :func:`check_not_empty`: every class folder at least one image.
- :func:`scan_images`: every file's first bytes against the image signatures (JPEG, PNG, GIF, BMP,
  WebP, TIFF, PNM), and for JPEG and PNG the end marker too (a truncated file lacks it). A file that
  passes is taken as readable without decoding it; any other file is decoded with PIL exactly as
  ImageFolder will, and is bad only if that fails: no false alarms, and the common case costs two
  small reads per file. Threads overlap the reads; under torch.distributed each rank scans 1/world of
  the files and the lists are gathered.
- :class:`ReplaceUnreadable`: at run time a sample whose file cannot be decoded (truncated after the
  scan, changed on disk, a flaky network mount) is replaced by another sample, picked
  deterministically, with one warning line per file; the count is ``samples_replaced`` in
  ``summary.json``. Past :func:`failure_limit` distinct bad files in one process, or when no
  replacement can be read either, the run stops with :class:`UnreadableData` (exit 1, checkpoints kept).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from .errors import TrainingFailure

BAD_IMAGE_POLICIES = ("refuse", "skip", "replace")
# (offset, bytes) that open a file of each format ImageFolder reads
SIGNATURES = {
    "jpeg": [(0, b"\xff\xd8\xff")],
    "png": [(0, b"\x89PNG\r\n\x1a\n")],
    "gif": [(0, b"GIF87a"), (0, b"GIF89a")],
    "bmp": [(0, b"BM")],
    "webp": [(8, b"WEBP")],
    "tiff": [(0, b"II*\x00"), (0, b"MM\x00*")],
    "pnm": [(0, b"P%d" % k) for k in range(1, 7)],
}
# what a complete file ends with (searched in its last bytes: writers may pad after the marker)
ENDINGS = {"jpeg": b"\xff\xd9", "png": b"IEND\xaeB`\x82"}
TAIL = 64
MAX_LISTED = 10


class UnreadableData(TrainingFailure):
    """Too many training images could not be read during the run (or none to replace one with)."""

    def __init__(self, message: str):
        # a DataLoader worker's exception comes back as "Caught ... Original Traceback ...": keep our line
        if "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("UnreadableData: ", 1)[-1]
        super().__init__(message)


def _format(header: bytes) -> str | None:
    for name, options in SIGNATURES.items():
        if any(header[at:at + len(sig)] == sig for at, sig in options):
            return name
    return None


def decode_error(path: str) -> str | None:
    """Why PIL cannot decode ``path`` as ImageFolder's loader does (None: it can)."""
    try:
        with Image.open(path) as im:
            im.convert("RGB")
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the decoder makes the file unreadable
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")


def check_file(path: str) -> str | None:
    """None if ``path`` looks like a complete image, else the reason it is unreadable."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            header = f.read(32)
            kind = _format(header)
            if kind in ENDINGS:
                f.seek(max(0, size - TAIL))
                if ENDINGS[kind] in f.read(TAIL):
                    return None
            elif kind is not None:
                return None
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    return decode_error(path)  # unknown signature or no end marker: decode it to be sure


def scan_images(paths: list[str], threads: int = 0) -> dict[str, str]:
    """``{path: reason}`` of the files in ``paths`` that cannot be read as images (see the module doc).
    Under torch.distributed every rank scans its share and all get the full answer."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    mine = paths[rank::world]
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        bad = {p: r for p, r in zip(mine, pool.map(check_file, mine, chunksize=64)) if r is not None}
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = {p: r for part in gathered for p, r in part.items()}
    return bad


def list_bad(bad: dict[str, str], root: str) -> str:
    shown = [f"{os.path.relpath(p, root)} ({r})" for p, r in sorted(bad.items())[:MAX_LISTED]]
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return "; ".join(shown) + more


def class_folders(split_dir: str) -> list[str]:
    """The class folders of a split, as torchvision's ImageFolder finds them (sorted)."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def check_layout(data_dir: str, splits: list[str], error) -> list[str]:
    """The common class list of ``splits`` (e.g. train, val); ``error(message)`` for a defect."""
    found = {}
    for split in splits:
        classes = class_folders(os.path.join(data_dir, split))
        if not classes:
            raise error(f"{os.path.join(data_dir, split)} holds no class folders; --dataset imagefolder expects "
                        f"{split}/<class>/<image files>, one folder per class")
        found[split] = classes
    first, *others = splits
    for other in others:
        if found[other] != found[first]:
            only_a = sorted(set(found[first]) - set(found[other]))
            only_b = sorted(set(found[other]) - set(found[first]))
            raise error(f"the class folders of {first}/ and {other}/ differ (only in {first}/: "
                        f"{', '.join(only_a) or 'none'}; only in {other}/: {', '.join(only_b) or 'none'}); "
                        "labels are the sorted folder names, so every split needs the same classes: add the "
                        "missing class folders or remove the extra ones")
    return found[first]


def check_not_empty(datasets: dict, root: str, error) -> None:
    """Refuse class folders without a single image file (``datasets``: split -> ImageFolder)."""
    empty = []
    for split, ds in datasets.items():
        counts = [0] * len(ds.classes)
        for t in ds.targets:
            counts[t] += 1
        empty += [f"{split}/{c}" for c, n in zip(ds.classes, counts) if n == 0]
    if empty:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        raise error(f"class folder(s) with no image files ({', '.join(IMG_EXTENSIONS)}) under {root}: "
                    f"{', '.join(empty)}; add images or remove the class from every split")


def drop_samples(ds, bad: dict[str, str]) -> int:
    """Remove the files in ``bad`` from an ImageFolder; the number removed."""
    keep = [(p, t) for p, t in ds.samples if p not in bad]
    removed = len(ds.samples) - len(keep)
    ds.samples = ds.imgs = keep
    ds.targets = [t for _, t in keep]
    return removed


def failure_limit(n: int) -> int:
    """Distinct unreadable files one process tolerates at run time: 1% of the data set, at least 10."""
    return max(10, n // 100)


class ReplaceUnreadable(Dataset):
    """``dataset[i]``, or, when its file cannot be decoded, the next readable sample of the sequence
    i + k * 7919 (mod n), k = 1, 2, ... (deterministic, so a rerun trains on the same batches).

    ``replaced`` counts replacements across DataLoader worker processes (shared memory)."""

    # what PIL raises for bad files
    ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

    def __init__(self, dataset: Dataset, name: str = "training"):
        self.dataset, self.name = dataset, name
        self._replaced = multiprocessing.get_context().Value("q", 0, lock=True)
        self._bad: set[int] = set()  # this process's unreadable indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, samples, targets ... of the wrapped ImageFolder
        if name in ("dataset", "_replaced", "_bad", "name"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def replaced(self) -> int:
        return int(self._replaced.value)

    def _path(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[index][0] if samples is not None else f"sample {index}"

    def __getitem__(self, index: int):
        n = len(self.dataset)
        for k in range(11):
            j = (index + k * 7919) % n
            if j in self._bad and k < 10:
                continue
            try:
                item = self.dataset[j]
            except self.ERRORS as exc:
                self._failed(j, exc)
                continue
            if k:
                with self._replaced.get_lock():
                    self._replaced.value += 1
            return item
        raise UnreadableData(f"{self.name} sample {index} ({self._path(index)}) and 10 replacements for it "
                             "could not be read; is the data directory still mounted and readable?")

    def _failed(self, j: int, exc: BaseException) -> None:
        if j in self._bad:
            return
        self._bad.add(j)
        limit = failure_limit(len(self.dataset))
        if len(self._bad) > limit:
            raise UnreadableData(f"more than {limit} {self.name} images could not be read during the run (the "
                                 f"latest: {self._path(j)}: {type(exc).__name__}: {exc}); check the data "
                                 "directory, or rerun with --bad_images refuse to list every bad file up front")
        print(f"warning: cannot read {self._path(j)} ({type(exc).__name__}: {exc}); it is replaced by another "
              f"sample wherever it is drawn ({len(self._bad)} unreadable so far in this process)",
              file=sys.stderr, flush=True)
