"""Step time of one worker: the dense model vs the LoFT sub-networks at S=2 and S=4.

One process, the models interleaved step by step (so machine noise hits all of them alike), median of
``--steps`` training steps (forward, backward, SGD step) each after ``--warmup`` steps. Prints the
ratio sub-network / dense. Absolute times are only meaningful on the machine that ran them; report
ratios from CPU machines and absolute times from a GPU.

    python benchmarks/step_time.py [--model resnet18] [--batch 128] [--steps 20]

Writes every step time, the medians, the ratios, the machine and the command to ``--output`` (JSON).

``--profile N`` then runs N more interleaved steps of each model under ``torch.profiler`` and prints where the
time goes: self CPU (or CUDA) time per step by kind of work (convolutions, batch norm, elementwise,
optimizer, ...), dense vs each sub-network, so a ratio that misses its target can be explained.
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
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N steps of each model and print time per kind of work")
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
    def step(k):
        loss = F.cross_entropy(models[k](x), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    times = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for k in models:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(k)
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
    profile = profile_steps(step, list(models), args.profile, device) if args.profile else None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"profile": profile, "model": args.model, "preset": args.preset, "batch": args.batch, "size": args.size,
                   "device": device, "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
                   "median_seconds": medians, "ratio_to_dense": {k: t / dense for k, t in medians.items()},
                   "step_seconds": times, "command": " ".join(sys.argv),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                               "python": platform.python_version()}, "seconds": time.time() - t_start}, f, indent=1)
    print(f"raw numbers in {args.output}")


# Kinds of work, matched in order against the profiler's op names (first match wins).
KINDS = (
    ("convolution", ("conv", "mkldnn_convolution")),
    ("batch norm", ("batch_norm",)),
    ("relu", ("relu", "threshold")),
    ("residual add", ("aten::add",)),
    ("pooling", ("pool",)),
    ("linear + loss", ("addmm", "aten::mm", "linear", "nll_loss", "log_softmax", "cross_entropy")),
    ("optimizer", ("_foreach", "sgd")),
    ("grad zero/accumulate", ("zero", "fill_", "copy_", "empty", "clone", "detach", "to_copy")),
)


def kind_of(op: str) -> str:
    low = op.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_steps(step, names: list[str], n: int, device: str) -> dict:
    """Self time per step by kind of work for every model (ms), from torch.profiler's op table."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    kinds = {k: {} for k in names}
    ops = {k: {} for k in names}
    for _ in range(n):
        for k in names:  # interleaved, one profiled step at a time, as the timing above
            with profile(activities=activities) as prof:
                step(k)
                if device == "cuda":
                    torch.cuda.synchronize()
            for ev in prof.key_averages():
                us = ev.self_device_time_total if device == "cuda" else ev.self_cpu_time_total
                if us > 0:
                    ops[k][ev.key] = ops[k].get(ev.key, 0.0) + us / 1e3 / n
                    kinds[k][kind_of(ev.key)] = kinds[k].get(kind_of(ev.key), 0.0) + us / 1e3 / n
    per_model = {k: {"ms_per_step_by_kind": kinds[k], "ms_per_step_by_op": ops[k]} for k in names}
    base = per_model[names[0]]["ms_per_step_by_kind"]
    seen = {kind for v in per_model.values() for kind in v["ms_per_step_by_kind"]}
    order = sorted(seen, key=lambda kind: base.get(kind, 0.0), reverse=True)
    total = {k: sum(v["ms_per_step_by_kind"].values()) for k, v in per_model.items()}
    print(f"\nprofile: self {'CUDA' if device == 'cuda' else 'CPU'} time per step (ms), {n} steps per model")
    print(f"  {'kind of work':22}" + "".join(f"{k:>10}{'ratio':>7}" for k in names))
    for kind in order:
        cells = [per_model[k]["ms_per_step_by_kind"].get(kind, 0.0) for k in names]
        print(f"  {kind:22}" + "".join(f"{c:10.1f}{(c / cells[0] if cells[0] else float('nan')):7.2f}" for c in cells))
    print(f"  {'total':22}" + "".join(f"{total[k]:10.1f}{total[k] / total[names[0]]:7.2f}" for k in names))
    return {"steps": n, "device_time": device == "cuda", "models": per_model, "total_ms_per_step": total}


if __name__ == "__main__":
    main()
