"""Inter-node bytes per rank per epoch of LoFT on several nodes, for both grid layouts.

The count is analytic (loft_ext.parallel.analytic.rank_bytes, the convention of loft_ext.parallel.comm:
all-reduce and all-gather are rings over a group's ranks in rank order, all-to-all is direct). The
measured counters equal it for both layouts (tests/test_grid.py checks this on two torchrun "nodes" on
loopback, and tests/test_distributed.py checks the totals), so no processes are started here.

Default: resnet50 (10 classes, 32x32 inputs), S=2 x D=2 on 2 nodes x 2 processes, preset paper, one
CIFAR-10 epoch: N = 50,000 samples, batch B = 128 per rank and step, L = 4. Every worker passes the
data set once per epoch and its D replicas split it, so a rank takes N / (D B) steps and N / (D B L)
rounds per epoch (fractional, as benchmarks/communication.py scales its counts). alltoall is counted
exactly over the first --rounds partitions (seed 0) and scaled to the epoch.

    python benchmarks/node_traffic.py
    python benchmarks/node_traffic.py --model resnet18 --workers 4 --replicas 2 --nodes 2

Writes benchmarks/results/node_traffic.json and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from loft_ext.models import create_model  # noqa: E402
from loft_ext.parallel import analytic  # noqa: E402
from loft_ext.parallel.grid import plan_layout  # noqa: E402
from loft_ext.partition.plan import make_plan  # noqa: E402
from loft_ext.parallel.sharded import shard_units  # noqa: E402
from loft_ext.partition.subnet import build_subnet, draw_partition  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2 ** 20


def fsdp_step_tally(model, plan, layout, rank: int, steps: int) -> dict:
    """FSDP2's own collectives of this rank's worker (all-gathers, reduce-scatters) over ``steps`` steps,
    as a ring over the worker's data group (``dp_grad``'s place; analytic.fsdp_step_bytes)."""
    worker, _ = layout.coords[rank]
    subnet = build_subnet(model, plan, worker)
    per = analytic.fsdp_step_bytes(subnet, shard_units(subnet), layout.replicas, 4, 4)
    moved = per["step_bytes_sent"] * steps
    out, into = analytic.ring_crossing(layout.data_ranks(worker), rank, layout.nodes)
    return {"bytes_sent": moved, "bytes_received": moved, "inter_node_bytes_sent": moved if out else 0.0,
            "inter_node_bytes_received": moved if into else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image_size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="S")
    ap.add_argument("--replicas", type=int, default=2, help="D")
    ap.add_argument("--nodes", type=int, default=2, help="nodes, each with S x D / nodes processes")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--samples", type=int, default=50_000, help="N: training samples per epoch")
    ap.add_argument("--batch", type=int, default=128, help="B: batch per rank and step")
    ap.add_argument("--local_steps", type=int, default=4, help="L")
    ap.add_argument("--rounds", type=int, default=8, help="alltoall partitions counted exactly (then scaled)")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "node_traffic.json"))
    args = ap.parse_args()
    t0 = time.time()
    S, D = args.workers, args.replicas
    world = S * D
    if world % args.nodes:
        ap.error(f"S x D = {world} processes do not divide over {args.nodes} nodes")
    per_node = world // args.nodes
    nodes = [r // per_node for r in range(world)]
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, in_chans=3)
    plan = make_plan(model, S, args.preset, (1, 3, args.image_size, args.image_size), args.model)
    steps_per_epoch = args.samples / (D * args.batch)
    rounds_per_epoch = steps_per_epoch / args.local_steps
    scale = rounds_per_epoch / args.rounds  # counted rounds -> one epoch (steps: L per round)
    rows = []
    for strategy, replicas in (("allgather", "ddp"), ("alltoall", "ddp"), ("allgather", "fsdp")):
        for order in ("replicas-within-node", "workers-within-node"):
            layout = plan_layout(nodes, S, order)
            ranks = []
            for r in range(world):
                c = analytic.rank_bytes(model, plan, layout, r, strategy, args.rounds,
                                        args.rounds * args.local_steps, 4,
                                        draw=lambda k: draw_partition(plan, 0, k), sharded=replicas == "fsdp")
                if replicas == "fsdp":  # FSDP's own per-step collectives replace DDP's all-reduce (data group)
                    c["dp_grad"] = fsdp_step_tally(model, plan, layout, r, args.rounds * args.local_steps)
                ranks.append({phase: {k: v * scale for k, v in counts.items()} for phase, counts in c.items()})

            def total(c, key):
                return sum(c[p][key] for p in ("sync", "shard_gather", "dp_grad") if p in c)

            inter = [total(c, "inter_node_bytes_sent") / MiB for c in ranks]
            sent = [total(c, "bytes_sent") / MiB for c in ranks]
            rows.append({"strategy": strategy, "replicas": replicas, "grid_order": order, "describe": layout.describe(),
                         "inter_node_mib_sent_per_rank": inter, "mib_sent_per_rank": sent,
                         "dp_grad_inter_node_mib": [c["dp_grad"]["inter_node_bytes_sent"] / MiB for c in ranks],
                         "sync_inter_node_mib": [c["sync"]["inter_node_bytes_sent"] / MiB for c in ranks],
                         "sync_mib": [c["sync"]["bytes_sent"] / MiB for c in ranks],
                         "per_rank": ranks})
    params = sum(p.numel() for p in model.parameters())
    result = {"model": args.model, "params": params, "classes": args.classes, "image_size": args.image_size,
              "workers": S, "replicas": D, "nodes": args.nodes, "processes_per_node": per_node,
              "preset": args.preset, "samples": args.samples, "batch": args.batch, "local_steps": args.local_steps,
              "steps_per_epoch": steps_per_epoch, "rounds_per_epoch": rounds_per_epoch, "counted_rounds": args.rounds,
              "convention": "ring (all-reduce, all-gather: a rank sends to its successor in rank order), direct "
                            "(all-to-all); analytic, equal to the measured counters (tests/test_grid.py)",
              "rows": rows, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": platform.platform(), "torch": torch.__version__, "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.model} ({params / 1e6:.2f}M params), S={S} x D={D} on {args.nodes} nodes x {per_node} processes, "
          f"{args.preset}; one epoch = {steps_per_epoch:.1f} steps = {rounds_per_epoch:.1f} rounds per rank "
          f"(N={args.samples}, B={args.batch}, L={args.local_steps})")
    print(f"{'sync':10} {'replicas':8} {'grid order':22} {'inter-node MiB/rank/epoch (all phases), per rank':50} "
          f"{'of which dp_grad':18} {'all MiB sent/rank':>17} {'sync MiB/rank':>13}")
    for row in rows:
        inter = " ".join(f"{x:9.1f}" for x in row["inter_node_mib_sent_per_rank"])
        grad = max(row["dp_grad_inter_node_mib"])
        print(f"{row['strategy']:10} {row['replicas']:8} {row['grid_order']:22} {inter:50} {grad:18.1f} "
              f"{max(row['mib_sent_per_rank']):17.1f} {max(row['sync_mib']):13.1f}")
    ddp_sync, fsdp_sync = (max(r["sync_mib"]) for r in rows if r["strategy"] == "allgather" and r["grid_order"] ==
                           "replicas-within-node")
    print(f"LoFT sync (filter axis) per rank, fsdp / ddp replicas: {fsdp_sync / ddp_sync:.4f} (1/D = {1 / D:.4f})")
    print(f"written to {args.output} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
