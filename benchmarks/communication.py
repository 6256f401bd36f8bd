"""Bytes per rank per epoch: DDP, local SGD, LoFT allgather / alltoall, and the authors' star protocol.

Every method is run for real on gloo processes (torchrun, benchmarks/comm_worker.py) for a few steps
or rounds; what loft_ext's counting layer (and, for DDP, a counting DDP communication hook) measured
is scaled to one CIFAR-10 epoch: N = 50,000 samples, batch B = 128 per rank and step, n ranks, so
every method processes the same samples with the same per-rank batch: N / (n B) steps per rank and
N / (n B L) rounds. The star protocol (every worker sends and receives its model every round:
2 (|shared| + |split| / S) scalars) is computed from its formula. Measured numbers sit next to the
analytic ones.

    make bench                       # or: python benchmarks/communication.py
    python benchmarks/communication.py --models resnet18 --ranks 2

Writes benchmarks/results/communication.json (every raw number, the machine, versions, the command)
and prints one table of ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from loft_ext.models import create_model  # noqa: E402
from loft_ext.parallel import analytic  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402
from loft_ext.partition.subnet import draw_partition  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("ddp", "localsgd", "allgather", "alltoall")
SAMPLES, BATCH, ELEM = 50_000, 128, 4


def launch(model: str, methods: list[str], n: int, local_steps: int, rounds: int, out_dir: str) -> dict:
    """Run ``methods`` one after another in one torchrun launch of n ranks; per method, every rank's record
    (also left in ``out_dir/<model>-<method>-<n>.rank<r>.json``)."""
    prefix = os.path.join(out_dir, f"{model}-{{method}}-{n}")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", str(n),
           os.path.join(HERE, "comm_worker.py"), "--model", model, "--method", *methods,
           "--local_steps", str(local_steps), "--rounds", str(rounds), "--out", prefix]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200 * len(methods))
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {' '.join(methods)} n={n} failed:\n{proc.stderr[-3000:]}")
    return {m: [json.load(open(f"{prefix.format(method=m)}.rank{r}.json")) for r in range(n)] for m in methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4], help="n = S for LoFT, n ranks for DDP / local SGD")
    ap.add_argument("--local_steps", type=int, default=8, help="L for local SGD and LoFT")
    ap.add_argument("--rounds", type=int, default=2, help="rounds measured per run (steps = rounds x L)")
    ap.add_argument("--preset", default="all")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "communication.json"))
    ap.add_argument("--runs_dir", help="where the ranks' records go (default: the folder of --output)")
    args = ap.parse_args()
    args.runs_dir = args.runs_dir or os.path.dirname(os.path.abspath(args.output))
    os.makedirs(args.runs_dir, exist_ok=True)
    L, t0 = args.local_steps, time.time()
    records, table = [], []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=3)
        params = sum(p.numel() for p in model.parameters())
        for n in args.ranks:
            steps_per_epoch = SAMPLES / (n * BATCH)
            rounds_per_epoch = steps_per_epoch / L
            plan = make_plan(model, n, args.preset, (1, 3, 32, 32), name)
            split = sum(p.numel() for k, p in model.named_parameters() if k in plan.tensor_dims)
            row = {"model": name, "n": n}
            runs = launch(name, list(METHODS), n, L, args.rounds, args.runs_dir)
            for method in METHODS:
                ranks = runs[method]
                measured = max(r["bytes_sent"] for r in ranks)
                if method == "ddp":
                    per_unit, units = measured / ranks[0]["steps"], steps_per_epoch
                    exact = 2 * (n - 1) / n * ELEM * params * ranks[0]["steps"]
                    expected = 2 * (n - 1) / n * ELEM * params
                elif method == "localsgd":
                    per_unit, units = measured / ranks[0]["rounds"], rounds_per_epoch
                    exact = 2 * (n - 1) / n * ELEM * params * ranks[0]["rounds"]
                    expected = 2 * (n - 1) / n * ELEM * params
                elif method == "allgather":
                    per_unit, units = measured / args.rounds, rounds_per_epoch
                    expected = analytic.allgather_round_bytes(model, plan, n, ELEM)
                    exact = expected * args.rounds
                else:
                    per_unit, units = measured / args.rounds, rounds_per_epoch
                    exact = max(sum(analytic.alltoall_round_bytes(model, plan, draw_partition(plan, 0, r),
                                                                  draw_partition(plan, 0, r + 1), w, n, ELEM)[0]
                                    for r in range(args.rounds)) for w in range(n))
                    expected = analytic.alltoall_expected_round_bytes(model, plan, n, ELEM)
                row[method] = expected * units  # projection from the analytic (expected) count
                row[method + "_measured_epoch"] = per_unit * units
                row[method + "_measured_vs_exact"] = measured / exact
                records.append({"model": name, "n": n, "method": method, "measured_bytes": measured,
                                "analytic_bytes_same_steps": exact, "per_step_or_round_expected": expected,
                                "ranks": ranks})
            row["star"] = 2 * ELEM * ((params - split) + split / n) * rounds_per_epoch
            table.append(row)
    print(f"bytes sent per rank per epoch (CIFAR-10: {SAMPLES} samples, batch {BATCH}/rank, L={L}, preset "
          f"{args.preset}); MiB, projected from the analytic count; measured/analytic over the runs\n")
    head = (f"{'model':9} {'n=S':>3} {'DDP':>9} {'localSGD':>9} {'star':>8} {'allgather':>9} {'alltoall':>9} "
            f"{'DDP/a2a':>8} {'lSGD/a2a':>8} {'star/a2a':>8} {'meas/analytic (ddp lsgd ag a2a)':>32}")
    print(head)
    mib = 2.0 ** 20
    for r in table:
        check = " ".join(f"{r[m + '_measured_vs_exact']:.4f}" for m in ("ddp", "localsgd", "allgather", "alltoall"))
        print(f"{r['model']:9} {r['n']:>3} {r['ddp'] / mib:9.1f} {r['localsgd'] / mib:9.1f} {r['star'] / mib:8.1f} "
              f"{r['allgather'] / mib:9.1f} {r['alltoall'] / mib:9.1f} {r['ddp'] / r['alltoall']:8.1f} "
              f"{r['localsgd'] / r['alltoall']:8.2f} {r['star'] / r['alltoall']:8.2f} {check:>32}")
    with open(args.output, "w") as f:
        json.dump({"table": table, "runs": records, "command": " ".join(sys.argv),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                               "python": platform.python_version()}, "seconds": time.time() - t0}, f, indent=1)
    print(f"\nraw numbers in {args.output} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
