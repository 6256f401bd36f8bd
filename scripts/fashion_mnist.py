#!/usr/bin/env python3
"""Put the full Fashion-MNIST into torchvision's layout: <data_dir>/FashionMNIST/raw/*-ubyte.

Source: Debian's package ``dataset-fashion-mnist`` (the four ``*-ubyte.gz`` files of Zalando's release
in /usr/share/datasets/fashion-mnist/). Where the package is missing, it is installed with apt-get
(non-interactive) when this runs as root on a system with apt; otherwise the script says what to do
and exits 1. The files are decompressed (torchvision's ``FashionMNIST._check_exists`` looks for the
uncompressed ``train-images-idx3-ubyte`` etc.; it never reads the ``.gz``), then checked: IDX magic
numbers, 60,000 / 10,000 images of 28x28, labels 0-9 with 6,000 / 1,000 per class.

  python3 scripts/fashion_mnist.py                  # -> data/FashionMNIST/raw/ (make data-fashion-mnist)
  python3 scripts/fashion_mnist.py --data_dir DIR   # -> DIR/FashionMNIST/raw/

Idempotent: files that are already there and pass the checks are kept. Standard library only.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import sys

PACKAGE = "dataset-fashion-mnist"
SOURCE = "/usr/share/datasets/fashion-mnist"
# name -> (IDX magic, number of items, per-class count); images are 28x28
FILES = {
    "train-images-idx3-ubyte": (2051, 60000, None),
    "train-labels-idx1-ubyte": (2049, 60000, 6000),
    "t10k-images-idx3-ubyte": (2051, 10000, None),
    "t10k-labels-idx1-ubyte": (2049, 10000, 1000),
}


def check_idx(path: str, magic: int, count: int, per_class: int | None) -> str | None:
    """None if ``path`` is the expected IDX file, else what is wrong with it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than an IDX header"
            m, n = struct.unpack(">II", head)
            if (m, n) != (magic, count):
                return f"header says magic {m}, {n} items; expected magic {magic}, {count} items"
            if magic == 2051:
                rows, cols = struct.unpack(">II", f.read(8))
                size = os.path.getsize(path)
                if (rows, cols) != (28, 28) or size != 16 + count * 28 * 28:
                    return f"{rows}x{cols} images in {size} bytes; expected 28x28 in {16 + count * 784}"
            else:
                labels = f.read()
                if len(labels) != count:
                    return f"{len(labels)} labels; expected {count}"
                counts = [labels.count(bytes([c])) for c in range(10)]
                if counts != [per_class] * 10:
                    return f"labels per class {counts}; expected {per_class} of each of 0-9"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def install_package() -> bool:
    """apt-get install of the Debian package (root only); True when it succeeded."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE]
    print(f"installing Debian's {PACKAGE} (about 31 MB): {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env).returncode == 0:
        return True
    print("apt-get install failed; refreshing the package lists (apt-get update) and trying again", flush=True)
    subprocess.run(["apt-get", "update"], env=env)
    return subprocess.run(cmd, env=env).returncode == 0


def how_to(raw: str) -> str:
    return (f"Fashion-MNIST is not installed. Either\n"
            f"  - as root on Debian/Ubuntu: apt-get update && apt-get install -y {PACKAGE}\n"
            f"    then run this again (make data-fashion-mnist), or\n"
            f"  - put the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,\n"
            f"    t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz of Zalando's Fashion-MNIST\n"
            f"    (github.com/zalandoresearch/fashion-mnist) into {raw}/ and run this again.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data", help="root of torchvision's layout (default: data)")
    parser.add_argument("--source", default=SOURCE, help=f"folder holding the *-ubyte.gz files (default: {SOURCE})")
    args = parser.parse_args(argv)
    raw = os.path.join(args.data_dir, "FashionMNIST", "raw")

    todo = [n for n, spec in FILES.items() if check_idx(os.path.join(raw, n), *spec) is not None]
    if not todo:
        print(f"Fashion-MNIST is ready in {raw}/ (60000 train, 10000 test)")
        return 0

    def source_of(name: str) -> str | None:
        for folder in (raw, args.source):  # .gz files put next to the outputs by hand win
            path = os.path.join(folder, name + ".gz")
            if os.path.isfile(path):
                return path
        return None

    if any(source_of(n) is None for n in todo):
        if args.source != SOURCE:
            print(f"error: {args.source} does not hold the *-ubyte.gz files\n" + how_to(raw), file=sys.stderr)
            return 1
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            why = "apt-get is not available" if shutil.which("apt-get") is None else "not running as root"
            print(f"error: {why}, so {PACKAGE} cannot be installed here.\n" + how_to(raw), file=sys.stderr)
            return 1
        if not install_package() or any(source_of(n) is None for n in todo):
            print(f"error: installing {PACKAGE} did not provide {SOURCE}/*-ubyte.gz\n" + how_to(raw),
                  file=sys.stderr)
            return 1

    os.makedirs(raw, exist_ok=True)
    for name in todo:
        src, dst = source_of(name), os.path.join(raw, name)
        tmp = dst + ".tmp"
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        problem = check_idx(tmp, *FILES[name])
        if problem:
            os.remove(tmp)
            print(f"error: {src} is not the expected Fashion-MNIST file: {problem}", file=sys.stderr)
            return 1
        os.replace(tmp, dst)
        print(f"wrote {dst} (from {src})")
    print(f"Fashion-MNIST is ready in {raw}/ (60000 train, 10000 test); use --dataset fashion_mnist "
          f"--data_dir {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
