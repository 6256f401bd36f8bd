"""One rank of the sync-time benchmark (launched by benchmarks/sync_time.py with torchrun).

For each sync strategy named, from a fresh model: a LoFT engine on the gloo grid of all ranks
(S = world size, D = 1), then ``--warmup`` + ``--rounds`` rounds of: load the round's slices, L local
steps on synthetic CIFAR-shaped batches, a barrier, ``engine.sync()``. Each phase is timed with
``time.perf_counter``; the barrier is timed apart (it is the wait for the slower rank, not sync work).
Writes the per-round times and the bytes ``Comm`` counted, per rank and strategy, to ``--out``.
With ``--profile`` the measured rounds' syncs also run under ``torch.profiler``: self CPU time per op
per sync goes into the record too (where a sync's local work goes, beside the collectives).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loft_ext.engine.loft import LoFTEngine  # noqa: E402
from loft_ext.engine.loop import local_step  # noqa: E402
from loft_ext.models import create_model  # noqa: E402
from loft_ext.parallel.comm import Comm  # noqa: E402
from loft_ext.parallel.grid import build_grid  # noqa: E402
from loft_ext.parallel.sync import STRATEGIES  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402


def time_rounds(strategy: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    """Per-round seconds of load, compute (L steps), wait (barrier) and sync for one strategy on this rank."""
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=3)
    grid = build_grid(world)
    plan = make_plan(model, world, args.preset, (1, 3, args.size, args.size), args.model)
    comm = Comm()
    engine = LoFTEngine(model, plan, make_optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), seed=0,
                        grid=grid, comm=comm, strategy=strategy)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=g),
                torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(args.local_steps)]
    worker = engine.workers[0]
    rounds = []
    ops: dict[str, float] = {}
    for r in range(args.warmup + args.rounds):
        t0 = time.perf_counter()
        engine.begin_round(r)
        t1 = time.perf_counter()
        for x, y in batches:
            local_step(worker, x, y)
        t2 = time.perf_counter()
        dist.barrier()
        t3 = time.perf_counter()
        sent_before = comm.totals().get("sync", {}).get("bytes_sent", 0.0)
        profiled = args.profile and r >= args.warmup
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled \
                else contextlib.nullcontext() as prof:
            engine.sync()
        t4 = time.perf_counter()
        if profiled:
            for ev in prof.key_averages():
                ops[ev.key] = ops.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e3 / args.rounds
        if r >= args.warmup:
            rounds.append({"round": r, "load": t1 - t0, "compute": t2 - t1, "wait": t3 - t2, "sync": t4 - t3,
                           "sync_bytes_sent": comm.totals()["sync"]["bytes_sent"] - sent_before})
    dist.barrier()
    return {"rank": rank, "world": world, "strategy": strategy, "model": args.model, "batch": args.batch,
            "local_steps": args.local_steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "rounds": rounds, "profile_ms_per_sync": ops if args.profile else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--local_steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--preset", default="all")
    ap.add_argument("--profile", action="store_true", help="profile the measured syncs (self CPU time per op)")
    ap.add_argument("--out", required=True, help="file prefix; {strategy} is filled in")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for strategy in args.strategies:
            record = time_rounds(strategy, args, rank, world)
            with open(f"{args.out.format(strategy=strategy)}.rank{rank}.json", "w") as f:
                json.dump(record, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
