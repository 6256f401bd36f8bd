#!/usr/bin/env python
"""Cost of the unreadable-image scan (loft_ext/images.py) per file, warm and cold page cache, next to
decoding every file with PIL (what a scan that trusts nothing but the decoder would cost).

  python benchmarks/image_scan.py --files 2000 --size 256      writes JPEGs and PNGs to a temp dir

Cold: every file is evicted from the page cache first (posix_fadvise DONTNEED; no root needed for
files we wrote), so the scan reads from the disk. Prints one JSON line.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loft_ext.images import decode_error, scan_images  # noqa: E402


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, paths, cold):
    if cold:
        evict(paths)
    t0 = time.perf_counter()
    fn(paths)
    return (time.perf_counter() - t0) / len(paths) * 1e6  # microseconds per file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--dir", default="", help="where to write the images (default: a temp dir)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
        paths = []
        for i in range(args.files):
            img = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
            path = os.path.join(root, f"{i}.{'jpg' if i % 2 else 'png'}")
            img.save(path, quality=90) if i % 2 else img.save(path)
            paths.append(path)
        mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        decode = lambda ps: [decode_error(p) for p in ps]  # noqa: E731
        result = {"files": args.files, "size": args.size, "mean_file_kib": round(mean_kb, 1),
                  "threads": min(32, 4 * (os.cpu_count() or 1))}
        for cold in (True, False):
            tag = "cold" if cold else "warm"
            result[f"scan_us_per_file_{tag}"] = round(timed(lambda ps: scan_images(ps), paths, cold), 1)
            result[f"decode_us_per_file_{tag}"] = round(timed(decode, paths, cold), 1)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
