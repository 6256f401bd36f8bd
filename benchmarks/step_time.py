"""Step time of one worker: the dense model vs the LoFT sub-networks at S=2 and S=4.

One process, the models interleaved step by step (so machine noise hits all of them alike), median of
``--steps`` training steps (forward, backward, SGD step) each after ``--warmup`` steps. Every model is
measured in both memory formats (``--layouts``: the default contiguous one and channels_last, the
recipe's ``--channels_last``), also interleaved. Prints the ratio sub-network / dense per layout and
channels_last / contiguous per model. Absolute times are only meaningful on the machine that ran
them; report ratios from CPU machines and absolute times from a GPU.

    python benchmarks/step_time.py [--model resnet18] [--batch 128] [--steps 20]

Writes every step time, the medians, the ratios, the machine and the command to ``--output`` (JSON).

``--profile N`` then runs N more interleaved steps of each model under ``torch.profiler`` and prints where the
time goes: self CPU (or CUDA) time per step by kind of work (convolutions, batch norm, elementwise,
optimizer, ...), dense vs each sub-network, so a ratio that misses its target can be explained.
"""
from __future__ import annotations

import argparse
import copy
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
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--preset", default="all")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=list(LAYOUTS),
                    help="memory formats measured, side by side (the recipe's default and --channels_last)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N steps of each model and print time per kind of work")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "step_time.json"))
    args = ap.parse_args()
    t_start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    full = create_model(args.model, num_classes=10, in_chans=3)
    nets = {"dense": full}
    for s in (2, 4):
        nets[f"S={s}"] = build_subnet(full, make_plan(full, s, args.preset, (1, 3, args.size, args.size)), 0)
    x0 = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    # every (layout, model) pair is its own copy; all are stepped in turn, so noise hits them alike
    models, opts, inputs = {}, {}, {}
    for layout in args.layouts:
        for name, net in nets.items():
            key = (layout, name)
            models[key] = copy.deepcopy(net).to(device, memory_format=LAYOUTS[layout])
            opts[key] = torch.optim.SGD(models[key].parameters(), lr=0.01, momentum=0.9)
        inputs[layout] = x0.contiguous(memory_format=LAYOUTS[layout])

    def step(key):
        loss = F.cross_entropy(models[key](inputs[key[0]]), y)
        opts[key].zero_grad(set_to_none=True)
        loss.backward()
        opts[key].step()

    times = {key: [] for key in models}
    for i in range(args.warmup + args.steps):
        for key in models:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(key)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    print(f"{args.model} ({args.preset}), batch {args.batch} at {args.size}px on {device}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    results = {}
    for layout in args.layouts:
        medians = {name: statistics.median(times[(layout, name)]) for name in nets}
        dense = medians["dense"]
        print(f"  {layout}:")
        for name, t in medians.items():
            print(f"    {name:6} {t:.4f} s, ratio to dense {t / dense:.3f}")
        results[layout] = {"median_seconds": medians, "ratio_to_dense": {k: t / dense for k, t in medians.items()},
                           "step_seconds": {name: times[(layout, name)] for name in nets}}
    if len(args.layouts) == 2:
        print("  channels_last / contiguous, same model: " + ", ".join(
            f"{name} {results['channels_last']['median_seconds'][name] / results['contiguous']['median_seconds'][name]:.3f}"
            for name in nets))
    for layout in args.layouts if args.profile else ():
        keys = [(layout, name) for name in nets]
        results[layout]["profile"] = profile_steps(step, keys, list(nets), args.profile, device, layout)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"layouts": results, "model": args.model, "preset": args.preset, "batch": args.batch,
                   "size": args.size, "device": device, "threads": torch.get_num_threads(), "steps": args.steps,
                   "warmup": args.warmup, "command": " ".join(sys.argv),
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


def profile_steps(step, keys: list, names: list[str], n: int, device: str, title: str = "") -> dict:
    """Self time per step by kind of work for every model (``keys`` for ``step``, shown as ``names``), in
    ms, from torch.profiler's op table."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    kinds = {k: {} for k in names}
    ops = {k: {} for k in names}
    for _ in range(n):
        for key, k in zip(keys, names):  # interleaved, one profiled step at a time, as the timing above
            with profile(activities=activities) as prof:
                step(key)
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
    print(f"\nprofile{' (' + title + ')' if title else ''}: self {'CUDA' if device == 'cuda' else 'CPU'} time per "
          f"step (ms), {n} steps per model")
    print(f"  {'kind of work':22}" + "".join(f"{k:>10}{'ratio':>7}" for k in names))
    for kind in order:
        cells = [per_model[k]["ms_per_step_by_kind"].get(kind, 0.0) for k in names]
        print(f"  {kind:22}" + "".join(f"{c:10.1f}{(c / cells[0] if cells[0] else float('nan')):7.2f}" for c in cells))
    print(f"  {'total':22}" + "".join(f"{total[k]:10.1f}{total[k] / total[names[0]]:7.2f}" for k in names))
    return {"steps": n, "device_time": device == "cuda", "models": per_model, "total_ms_per_step": total}


if __name__ == "__main__":
    main()
