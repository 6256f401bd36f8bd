"""Step time of one worker: the dense model vs the LoFT sub-networks at S=2 and S=4.

One process, the models interleaved step by step (so machine noise hits all of them alike), median of
``--steps`` training steps (forward, backward, SGD step) each after ``--warmup`` steps. Prints the
ratio sub-network / dense. Absolute times are only meaningful on the machine that ran them; report
ratios from CPU machines and absolute times from a GPU.

    python benchmarks/step_time.py [--model resnet18] [--batch 128] [--steps 20]

Writes every step time, the medians, the ratios, the machine and the command to ``--output`` (JSON).
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
import torch.nn.functional as F  # noqa: E402

from loft_ext.models import create_model  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402
from loft_ext.partition.subnet import build_subnet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--preset", default="all")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "step_time.json"))
    args = ap.parse_args()
    t_start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    full = create_model(args.model, num_classes=10, in_chans=3)
    models = {"dense": full}
    for s in (2, 4):
        models[f"S={s}"] = build_subnet(full, make_plan(full, s, args.preset, (1, 3, args.size, args.size)), 0)
    opts = {k: torch.optim.SGD(m.to(device).parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for k, m in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    print(f"{args.model} ({args.preset}), batch {args.batch} at {args.size}px on {device}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    medians = {k: statistics.median(t) for k, t in times.items()}
    for k, t in medians.items():
        print(f"  {k:6} step time ratio to dense {t / dense:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"model": args.model, "preset": args.preset, "batch": args.batch, "size": args.size,
                   "device": device, "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
                   "median_seconds": medians, "ratio_to_dense": {k: t / dense for k, t in medians.items()},
                   "step_seconds": times, "command": " ".join(sys.argv),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                               "python": platform.python_version()}, "seconds": time.time() - t_start}, f, indent=1)
    print(f"raw numbers in {args.output}")


if __name__ == "__main__":
    main()
