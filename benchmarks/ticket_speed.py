"""Inference speed of compact tickets: dense vs compact, eager vs exported, 1 thread vs all threads.

For every model (``name:size``), the dense model and structured tickets at every ``--ratios`` and every
``--scopes`` (``per-group``: block-hidden groups only; ``hidden+stream``: also the residual streams),
all made with preset ``all`` and the l2 score from the same seeded weights, are measured in eval mode,
under ``torch.no_grad()``, fp32, contiguous layout:

- latency at batch 1 (median seconds per call) and throughput at batch 64 (images / s from the median);
- with one intra-op thread and with all CPUs (``torch.set_num_threads``);
- eager (the ``nn.Module``) and exported (``torch.export`` program, ``ticket.pt2``'s form, ``.module()``).

Each measurement: ``--warmup`` calls, then ``--repeats`` timed calls, the models of one (engine, threads,
batch) cell interleaved call by call so that machine noise hits them alike. The speed-up of a ticket is
dense time / ticket time in the same cell; its FLOP ratio is dense FLOPs / ticket FLOPs (torch's
FlopCounterMode: convolutions and matrix products; norms, pooling, adds and activations count zero).

    python benchmarks/ticket_speed.py                    # resnet18 @ 32x32 and resnet50 @ 64x64
    python benchmarks/ticket_speed.py --smoke            # resnet18 @ 32x32, r=0.8, tiny batches: runs, seconds

Writes every time, the speed-ups, FLOPs, parameters, the machine and the command to ``--output`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from loft_ext.models import create_model  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402
from loft_ext.tickets.deploy import export_program  # noqa: E402
from loft_ext.tickets.export import compact_model  # noqa: E402
from loft_ext.tickets.prune import structured_ticket  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def flops(model: torch.nn.Module, shape) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return int(counter.get_total_flops())


@torch.no_grad()
def time_cell(models: dict, batch: int, size: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every model on one batch, interleaved call by call."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for m in models.values():
        for _ in range(warmup):
            m(x)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18:32", "resnet50:64"], help="timm name:input size")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.8])
    ap.add_argument("--scopes", nargs="+", default=["per-group", "hidden+stream"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="latency at the first, throughput at the rest")
    ap.add_argument("--threads", nargs="+", default=["1", "all"], help="intra-op threads per cell (all = every CPU)")
    ap.add_argument("--engines", nargs="+", default=["eager", "exported"], choices=["eager", "exported"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="resnet18 @ 32, r=0.8, batches 1 and 8, 2 repeats")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "ticket_speed.json"))
    args = ap.parse_args()
    if args.smoke:
        args.models, args.ratios, args.batches, args.threads = ["resnet18:32"], [0.8], [1, 8], ["1"]
        args.warmup, args.repeats = 1, 2
    t_start = time.time()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = sorted({cpus if t == "all" else int(t) for t in args.threads})
    rows, models_info = [], {}
    for spec in args.models:
        name, size = spec.split(":")
        size = int(size)
        shape = (1, 3, size, size)
        torch.manual_seed(0)
        dense = create_model(name, num_classes=10, in_chans=3).eval()
        plan = make_plan(dense, 1, "all", shape, name)
        nets = {"dense": dense}
        for scope in args.scopes:
            for r in args.ratios:
                nets[f"{scope} r={r:g}"] = compact_model(dense, structured_ticket(dense, plan, r, scope)).eval()
        info = {k: {"flops": flops(m, shape), "params": sum(p.numel() for p in m.parameters())} for k, m in nets.items()}
        models_info[spec] = info
        engines = {}
        t0 = time.time()
        if "eager" in args.engines:
            engines["eager"] = nets
        if "exported" in args.engines:
            engines["exported"] = {k: export_program(m, torch.zeros(2, 3, size, size)).module() for k, m in nets.items()}
        export_s = time.time() - t0
        print(f"{spec}: {len(nets) - 1} tickets, exported in {export_s:.1f} s; GFLOPs " +
              ", ".join(f"{k} {v['flops'] / 1e9:.3f}" for k, v in info.items()), flush=True)
        for engine, ms in engines.items():
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for batch in args.batches:
                    times = time_cell(ms, batch, size, args.warmup, args.repeats)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    for k in ms:
                        if k == "dense":
                            continue
                        scope, ratio = k.split(" r=")
                        speedup = med["dense"] / med[k]
                        flop_ratio = info["dense"]["flops"] / info[k]["flops"]
                        rows.append({"model": name, "size": size, "scope": scope, "ratio": float(ratio),
                                     "engine": engine, "threads": n_threads, "batch": batch,
                                     "dense_s": med["dense"], "ticket_s": med[k], "speedup": speedup,
                                     "flop_ratio": flop_ratio, "speedup_over_flop_ratio": speedup / flop_ratio,
                                     "dense_images_per_s": batch / med["dense"], "ticket_images_per_s": batch / med[k],
                                     "times_dense": times["dense"], "times_ticket": times[k]})
                        print(f"  {name:<9} {engine:<8} threads={n_threads} batch={batch:<3} {k:<20} "
                              f"{med[k] * 1e3:8.2f} ms vs dense {med['dense'] * 1e3:8.2f} ms: {speedup:5.2f}x "
                              f"(FLOPs {flop_ratio:5.2f}x)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"rows": rows, "models": models_info, "smoke": args.smoke, "threads": threads,
                   "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
                   "seconds": time.time() - t_start,
                   "command": " ".join(["python", os.path.relpath(sys.argv[0], os.path.dirname(HERE)), *sys.argv[1:]]),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                               "python": platform.python_version()}}, f, indent=1)
    print(f"raw numbers in {args.output}")


if __name__ == "__main__":
    main()
