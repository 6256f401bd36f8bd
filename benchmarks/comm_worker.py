"""One rank of the communication benchmark (launched by benchmarks/communication.py with torchrun).

Runs a few real rounds or steps of each method named on random CIFAR-sized data (bytes do not depend
on the data) and writes what the counting layer measured, per rank and method, to ``--out``. Several
methods share one launch (one process start and process group) to save the start-up time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loft_ext.engine.loft import LoFTEngine  # noqa: E402
from loft_ext.engine.loop import local_step  # noqa: E402
from loft_ext.models import create_model  # noqa: E402
from loft_ext.parallel.comm import Comm  # noqa: E402
from loft_ext.parallel.grid import build_grid  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402

METHODS = ("ddp", "localsgd", "allgather", "alltoall")


def run_method(method: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    """A few real rounds (or steps) of one method from a fresh model; what ``Comm`` counted on this rank."""
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=3)
    g = torch.Generator().manual_seed(rank)

    def batch():
        return torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)

    comm = Comm()
    steps = args.rounds * args.local_steps
    if method in ("ddp", "localsgd"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if method == "ddp":
            ddp = torch.nn.parallel.DistributedDataParallel(model)

            def counting_hook(state, bucket):  # the bytes DDP's ring all-reduce moves for this bucket
                n = bucket.buffer().numel() * bucket.buffer().element_size()
                moved = 2 * (world - 1) / world * n
                comm._count(moved, moved)
                return default_hooks.allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, counting_hook)
            net = ddp
        else:
            net = model
        for step in range(steps):
            x, y = batch()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if method == "localsgd" and (step + 1) % args.local_steps == 0:
                flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                comm.all_reduce(flat)  # full-model average every L steps
        rounds = steps // args.local_steps
    else:
        grid = build_grid(world)
        plan = make_plan(model, world, args.preset, (1, 3, 32, 32), args.model)
        engine = LoFTEngine(model, plan, make_optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), seed=0,
                            grid=grid, comm=comm, strategy=method)
        for r in range(args.rounds):
            engine.begin_round(r)
            for _ in range(args.local_steps):
                local_step(engine.workers[0], *batch())
            engine.sync()
        rounds = args.rounds
    totals = comm.totals()
    sent = sum(c["bytes_sent"] for c in totals.values())
    return {"rank": rank, "world": world, "method": method, "model": args.model, "steps": steps,
            "rounds": rounds, "bytes_sent": sent, "phases": totals}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", nargs="+", choices=METHODS, required=True,
                    help="one or more methods, run one after another in the same process group")
    ap.add_argument("--local_steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--preset", default="all")
    ap.add_argument("--out", required=True, help="file prefix; may hold {method}, filled in per method")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for method in args.method:
        record = run_method(method, args, rank, world)
        with open(f"{args.out.format(method=method)}.rank{rank}.json", "w") as f:
            json.dump(record, f)
        dist.barrier()  # no rank starts the next method's collectives while another still runs this one
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
