"""Sync time per round vs compute time per round of distributed LoFT, for both sync strategies.

Launches ``--nproc`` gloo processes with torchrun (benchmarks/sync_worker.py; S = number of processes,
D = 1, one worker each). Per strategy, from a fresh model, every rank runs ``--warmup`` rounds and then
``--rounds`` measured rounds of L local steps (``Worker.train_step`` on synthetic CIFAR-shaped
batches) followed by ``engine.sync()``, timed apart with ``time.perf_counter`` (a barrier between them,
timed as ``wait``, keeps one rank's slower compute out of the other's sync time). Per round the slowest
rank counts (the round ends when its sync does); reported is the median over rounds of each phase and
the ratio median sync / median compute.

Absolute times belong to the machine that ran them: on a CPU machine every process computes on one
core (OMP_NUM_THREADS=1) and the gloo transfer is a local copy through the loopback, so the ratio says
little about a cluster network; the bytes per round (also recorded) carry over.

    python benchmarks/sync_time.py [--model resnet18] [--local_steps 8] [--rounds 5] [--batch 128]

Writes every round's times and bytes per rank, the medians, the machine and the command to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGIES = ("allgather", "alltoall")
PHASES = ("load", "compute", "wait", "sync")


def launch(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run every strategy in one torchrun launch; per strategy, every rank's record."""
    prefix = os.path.join(args.runs_dir, f"sync-{args.model}-{{strategy}}-{args.nproc}")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node",
           str(args.nproc), os.path.join(HERE, "sync_worker.py"), "--model", args.model, "--strategies",
           *args.strategies, "--local_steps", str(args.local_steps), "--rounds", str(args.rounds), "--warmup",
           str(args.warmup), "--batch", str(args.batch), "--size", str(args.size), "--preset", args.preset,
           "--out", prefix] + (["--profile"] if args.profile else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"sync benchmark failed:\n{proc.stderr[-3000:]}")
    return {s: [json.load(open(f"{prefix.format(strategy=s)}.rank{r}.json")) for r in range(args.nproc)]
            for s in args.strategies}


def summarise(ranks: list[dict]) -> dict:
    """Per round the slowest rank's time of each phase; medians over rounds; sync / compute."""
    per_round = {ph: [max(rk["rounds"][i][ph] for rk in ranks) for i in range(len(ranks[0]["rounds"]))]
                 for ph in PHASES}
    median = {ph: statistics.median(v) for ph, v in per_round.items()}
    sync_bytes = max(rd["sync_bytes_sent"] for rk in ranks for rd in rk["rounds"])
    return {"median_seconds": median, "per_round_slowest_rank": per_round,
            "sync_over_compute": median["sync"] / median["compute"],
            "sync_share_of_round": median["sync"] / sum(median.values()),
            "sync_bytes_sent_per_round": sync_bytes, "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--nproc", type=int, default=2, help="gloo processes = S filter workers")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--local_steps", type=int, default=8, help="L")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per strategy")
    ap.add_argument("--warmup", type=int, default=2, help="rounds run first and not measured")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--preset", default="all")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the measured syncs and print rank 0's slowest ops (the profiler slows them)")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "sync_time.json"))
    ap.add_argument("--runs_dir", help="where the ranks' records go (default: the folder of --output)")
    args = ap.parse_args()
    args.runs_dir = args.runs_dir or os.path.dirname(os.path.abspath(args.output))
    os.makedirs(args.runs_dir, exist_ok=True)
    t0 = time.time()
    results = {s: summarise(ranks) for s, ranks in launch(args).items()}
    print(f"{args.model} ({args.preset}), {args.nproc} gloo processes (S={args.nproc}, D=1), L={args.local_steps}, "
          f"batch {args.batch} at {args.size}px, 1 thread per process; median of {args.rounds} rounds after "
          f"{args.warmup} warm-up, slowest rank per round\n")
    print(f"{'strategy':9} {'compute s':>9} {'sync s':>8} {'wait s':>8} {'load s':>8} {'sync MiB':>8} "
          f"{'sync/compute':>12}")
    for s, r in results.items():
        m = r["median_seconds"]
        print(f"{s:9} {m['compute']:9.3f} {m['sync']:8.4f} {m['wait']:8.4f} {m['load']:8.4f} "
              f"{r['sync_bytes_sent_per_round'] / 2 ** 20:8.2f} {r['sync_over_compute']:12.2%}")
    if args.profile:
        for s, r in results.items():
            ops = r["ranks"][0]["profile_ms_per_sync"]
            print(f"\n{s}: rank 0's self CPU time per sync under the profiler, slowest ops "
                  f"(total {sum(ops.values()):.1f} ms)")
            for op, ms in sorted(ops.items(), key=lambda kv: kv[1], reverse=True)[:10]:
                print(f"  {op:40} {ms:8.1f} ms")
    with open(args.output, "w") as f:
        json.dump({"strategies": results, "model": args.model, "nproc": args.nproc, "local_steps": args.local_steps,
                   "rounds": args.rounds, "warmup": args.warmup, "batch": args.batch, "size": args.size,
                   "preset": args.preset, "command": " ".join(sys.argv),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "torch": metadata.version("torch"), "python": platform.python_version()},
                   "seconds": time.time() - t0}, f, indent=1)
    print(f"\nraw numbers in {args.output} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
