"""Peak training memory of one worker: the dense model vs the LoFT sub-networks at S=2 and S=4.

Training memory = parameters (with the BatchNorm buffers) + gradients + SGD momentum + activations
saved for backward, for one training step of one model on a CIFAR-sized batch (3x32x32, 10 classes).
A sub-network is worker 0's (``build_subnet`` of ``make_plan(model, S, preset, input shape)``) with
its round-0 slices loaded. Every row runs in its own process, forked from a parent that has only
imported the libraries (``--parallel`` at a time: each process has its own peak); it takes two
measures, each the same for every row:

1. exact accounting: bytes of parameters and buffers; of the gradients and of the
   optimizer state after one real step of ``torch.optim.SGD(momentum=0.9)``; and of the activations:
   every storage autograd saved for backward during that step's forward, caught with
   ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage (views share a
   ``data_ptr``), parameters, buffers and the input batch (images, labels) left out.
2. resident memory, as a cross-check, taken first: the row's process builds the model and batch, runs
   one warm-up step on a throw-away copy (one-time library allocations), frees it and trims the
   heap, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reads VmRSS; it then trains
   two steps with the gradients kept between them (steady state: gradients and momentum live during
   the forward) and reads the peak VmHWM. The growth (gradients + momentum + activations + whatever
   backward holds transiently) plus the exact parameter bytes is the RSS measure. The row's process
   first sets glibc's mmap threshold to 64 KiB (``mallopt(M_MMAP_THRESHOLD)``, as
   ``MALLOC_MMAP_THRESHOLD_=65536`` would): every larger block is then mapped on its own and unmapped on
   free, so the peak follows the live bytes; with glibc's default (a threshold that moves as blocks are
   freed, freed heap kept) the same row's growth varied by 20% from run to run, with it by 0.2%.
   ``ru_maxrss`` is not used: a process inherits in that field the peak of the process that started
   it, so a difference of two subprocesses' values is wrong whenever the parent is the larger.

Prints, per model, the bytes of every part and the ratio sub-network / dense by each measure, and
writes every number to ``--output`` (JSON).

    python benchmarks/memory.py [--models resnet18 resnet50] [--workers 2 4] [--batch 128]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from itertools import chain

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from loft_ext.models import create_model  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402
from loft_ext.partition.subnet import Slicer, build_subnet, draw_partition  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = 10
MMAP_THRESHOLD = 65536  # bytes; glibc serves larger blocks by their own mmap in the rows' processes
M_MMAP_THRESHOLD = -3    # glibc's mallopt parameter number (malloc.h)
METHOD = ("exact: params+buffers, grads and SGD momentum after one real step, activations = storages saved "
          "for backward (saved_tensors_hooks, one count per storage, params/buffers/input excluded); "
          "rss: own process per row (glibc mmap threshold 64 KiB), peak VmHWM over 2 steps above VmRSS "
          "before them (heap trimmed, peak reset), plus exact param+buffer bytes")


def build_row(model_name: str, workers: int, preset: str, size: int) -> nn.Module:
    """The model one worker trains: the dense model (``workers`` = 1) or worker 0's sub-network."""
    torch.manual_seed(0)
    full = create_model(model_name, num_classes=CLASSES, in_chans=3)
    if workers == 1:
        return full
    plan = make_plan(full, workers, preset, (1, 3, size, size), model_name)
    sub = build_subnet(full, plan, 0)
    Slicer(plan, full, sub, 0).load(draw_partition(plan, 0, 0))
    return sub


def batch(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def exact_training_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Bytes of params + buffers, gradients, optimizer state and saved activations of one real step."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    held = {t.untyped_storage().data_ptr() for t in chain(model.parameters(), model.buffers(), [x, y])}
    saved: dict[int, tuple[str, int]] = {}  # storage data_ptr -> (top-level module that first saved it, bytes)
    running = ["loss"]  # the top-level child of the model whose forward is running (for the breakdown)
    hooks = [m.register_forward_pre_hook(lambda module, args, top=top: running.__setitem__(0, top))
             for top, child in model.named_children() for m in child.modules()]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held and storage.data_ptr() not in saved and storage.nbytes() > 0:
            saved[storage.data_ptr()] = (running[0], storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        running[0] = "loss"
        loss = F.cross_entropy(out, y)
    for h in hooks:
        h.remove()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    counts = {
        "params": sum(_nbytes(p) for p in model.parameters()),
        "buffers": sum(_nbytes(b) for b in model.buffers()),
        "grads": sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer_state": sum(_nbytes(v) for st in optimizer.state.values() for v in st.values()
                               if torch.is_tensor(v)),
        "activations": sum(nbytes for _, nbytes in saved.values()),
        "saved_storages": len(saved),
        "activations_by_module": {},  # top-level child of the model (stem parts, stages, head) -> bytes
    }
    for top, nbytes in saved.values():
        counts["activations_by_module"][top] = counts["activations_by_module"].get(top, 0) + nbytes
    counts["total"] = (counts["params"] + counts["buffers"] + counts["grads"] + counts["optimizer_state"]
                       + counts["activations"])
    return counts


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: the RSS measure loses its allocator settings, not its meaning


def _trim_heap() -> None:
    gc.collect()
    if _libc() is not None:
        _libc().malloc_trim(0)  # hand freed heap pages back to the kernel


def rss_growth(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> dict:
    """Peak RSS growth of ``steps`` training steps above the built model (meant for a fresh process)."""
    warm = copy.deepcopy(model)
    F.cross_entropy(warm(x[:2]), y[:2]).backward()  # one-time allocations (oneDNN, autograd, optimizer)
    torch.optim.SGD(warm.parameters(), lr=0.01, momentum=0.9).step()  # land in the baseline
    del warm
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    peak = _status_kib("VmHWM")
    return {"rss_before_kib": before, "rss_peak_kib": peak, "growth": (peak - before) * 1024, "steps": steps}


def measure_row(model_name: str, workers: int, preset: str, size: int, batch_size: int) -> dict:
    """Both measures of one row, in a process of its own: RSS first, then the exact count on the same model."""
    if _libc() is not None:
        _libc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # also stops glibc from moving the threshold
    torch.set_num_threads(1)
    model = build_row(model_name, workers, preset, size)
    x, y = batch(size, batch_size)
    rss = rss_growth(model, x, y)
    return {"rss": rss, "exact": exact_training_bytes(model, x, y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--workers", nargs="+", type=int, default=[2, 4], help="S of the sub-networks (dense is S=1)")
    ap.add_argument("--preset", default="all")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                    help="row processes at a time (each has its own peak, so they may overlap)")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "memory.json"))
    args = ap.parse_args()
    t0 = time.time()
    rows_wanted = [(m, s) for m in args.models for s in [1, *args.workers]]
    # fork: every row starts from this process as it is now (libraries imported, no model built, no
    # torch thread started) without paying for the imports again; one row per process
    with multiprocessing.get_context("fork").Pool(args.parallel, maxtasksperchild=1) as pool:
        results = pool.starmap(measure_row, [(m, s, args.preset, args.size, args.batch) for m, s in rows_wanted],
                               chunksize=1)
    measured = dict(zip(rows_wanted, results))
    rows = []
    for name, s in rows_wanted:
        e, r = measured[name, s]["exact"], measured[name, s]["rss"]
        step_exact = e["grads"] + e["optimizer_state"] + e["activations"]
        rows.append({"model": name, "S": s, "exact": e, "rss": r, "exact_step_bytes": step_exact,
                     "rss_total": e["params"] + e["buffers"] + r["growth"]})
    for row in rows:
        dense = next(d for d in rows if d["model"] == row["model"] and d["S"] == 1)
        row["ratio_exact"] = row["exact"]["total"] / dense["exact"]["total"]
        row["ratio_rss"] = row["rss_total"] / dense["rss_total"]
        row["ratio_activations"] = row["exact"]["activations"] / dense["exact"]["activations"]
        row["ratio_params"] = row["exact"]["params"] / dense["exact"]["params"]
    mib = 2.0 ** 20
    print(f"peak training memory of one worker, batch {args.batch} at {args.size}px, {CLASSES} classes, preset "
          f"{args.preset}, fp32, SGD momentum 0.9; MiB\nmethod: {METHOD}\n")
    print(f"{'model':9} {'S':>2} {'params':>8} {'grads':>8} {'momentum':>8} {'activ.':>8} {'exact':>8} "
          f"{'rss grow':>8} {'rss tot':>8} {'exact/dense':>11} {'rss/dense':>9} {'act/dense':>9}")
    for r in rows:
        e = r["exact"]
        print(f"{r['model']:9} {r['S']:>2} {(e['params'] + e['buffers']) / mib:8.1f} {e['grads'] / mib:8.1f} "
              f"{e['optimizer_state'] / mib:8.1f} {e['activations'] / mib:8.1f} {e['total'] / mib:8.1f} "
              f"{r['rss']['growth'] / mib:8.1f} {r['rss_total'] / mib:8.1f} {r['ratio_exact']:11.3f} "
              f"{r['ratio_rss']:9.3f} {r['ratio_activations']:9.3f}")
    print("\nactivations saved for backward by the top-level module that saved them first; MiB")
    for name in args.models:
        model_rows = [r for r in rows if r["model"] == name]
        modules = list(model_rows[0]["exact"]["activations_by_module"])
        print(f"{name:9} {'S':>2} " + " ".join(f"{m:>8}" for m in modules))
        for r in model_rows:
            by_module = r["exact"]["activations_by_module"]
            print(f"{'':9} {r['S']:>2} " + " ".join(f"{by_module.get(m, 0) / mib:8.1f}" for m in modules))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"rows": rows, "method": METHOD, "batch": args.batch, "size": args.size, "preset": args.preset,
                   "command": " ".join(sys.argv),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                               "python": platform.python_version()}, "seconds": time.time() - t0}, f, indent=1)
    print(f"\nraw numbers in {args.output} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
