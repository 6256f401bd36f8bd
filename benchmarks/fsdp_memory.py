"""Per-rank training memory and LoFT sync bytes of FSDP replicas vs DDP replicas (``--replicas fsdp`` / ``ddp``).

S x D gloo processes (default resnet50, S=2 x D=2, preset all, 3x32x32 inputs, batch 128 per rank), each
running one LoFT round with each replica mode from the same model: one training step of SGD with momentum,
then the sync. Per rank, exact accounting as in benchmarks/memory.py:

- ``params``, ``grads``, ``optimizer_state``: bytes this rank holds for the module that trains
  (``loft_ext.parallel.sharded.training_state_bytes``: an FSDP shard counts its local part only);
- ``buffers``: the training module's floating buffers (BatchNorm statistics; FSDP does not shard them);
- ``plain_copy``: FSDP only, what the plain narrowed sub-network (loaded at every round start, then copied
  into the shards) holds during the round: its buffers; its parameters' storage is released until the next
  load; under DDP the training module is that sub-network;
- ``full_model``: the full model every rank keeps under ``--sync allgather``;
- ``activations``: every storage autograd saved for backward in the step's forward of the plain
  sub-network (parameters and the input left out; the same sub-network computes the same tensors under
  both modes, so it is counted once and used for both);
- ``fsdp_unsharded``: FSDP only, an estimate of the unsharded parameters FSDP2 holds at once during the
  step: the root group's (never resharded) plus the two largest other groups (one computing, one
  prefetched).

Also the bytes each rank sent in the sync (``sync``: the filter axis) and ``shard_gather`` (FSDP: the D
shards put together), measured by loft_ext's counting ``Comm``.

    python benchmarks/fsdp_memory.py [--model resnet50] [--workers 2] [--replicas 2] [--batch 128]

Writes every number to ``--output`` (JSON) and prints one table with the ratios fsdp / ddp.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2.0 ** 20


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_activation_bytes(module, x, y) -> int:
    """Bytes of the distinct storages autograd saves in ``module``'s forward, parameters and input excluded."""
    skip = {p.data_ptr() for p in module.parameters()} | {x.data_ptr(), y.data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in skip and t.untyped_storage().nbytes():
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(module(x), y)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(seen.values())


def fsdp_unsharded_bytes(subnet, elem: int = 4) -> int:
    """Root group's parameters plus the two largest block groups (loft_ext.parallel.sharded.shard_units), from
    the sharded module (its DTensors have the global shapes)."""
    from loft_ext.parallel.sharded import shard_units

    units = shard_units(subnet)
    in_units = {id(p) for u in units for p in u.parameters()}
    root = sum(p.numel() for p in subnet.parameters() if id(p) not in in_units)
    sizes = sorted((sum(p.numel() for p in u.parameters()) for u in units), reverse=True)
    return (root + sum(sizes[:2])) * elem


def measure(mode: str, model_name: str, base, plan, grid, batch, image_size, seed) -> dict:
    from loft_ext.engine.loft import LoFTEngine
    from loft_ext.engine.loop import local_step
    from loft_ext.models import create_model
    from loft_ext.parallel.sharded import training_state_bytes

    model = create_model(model_name, 10)
    model.load_state_dict(base.state_dict())
    engine = LoFTEngine(model, plan, seed=0, grid=grid, replicas=mode,
                        make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
    w = engine.workers[0]
    engine.begin_round(0)
    g = torch.Generator().manual_seed(seed + grid.rank)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    local_step(w, x, y)
    state = training_state_bytes(w.module, w.optimizer)
    floats = [b for b in w.module.buffers() if b.is_floating_point()]
    out = {**state, "buffers": _bytes(floats),
           "full_model": _bytes(model.parameters()) + _bytes(b for b in model.buffers() if b.is_floating_point()),
           "plain_copy": 0, "fsdp_unsharded": 0}
    if w.sharded is not None:  # during the round the plain copy keeps its buffers, its parameters are released
        out["plain_copy"] = _bytes(w.model.parameters()) + _bytes(b for b in w.model.buffers() if b.is_floating_point())
        out["fsdp_unsharded"] = fsdp_unsharded_bytes(w.sharded.module)
    else:
        out["activations"] = saved_activation_bytes(w.model, x, y)
    engine.sync()
    out["comm"] = {phase: c.sent for phase, c in engine.comm.counters.items()}
    return out


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from loft_ext.models import create_model
    from loft_ext.parallel.grid import build_grid
    from loft_ext.partition.plan import make_plan

    torch.manual_seed(0)
    base = create_model(args.model, 10)
    plan = make_plan(base, args.workers, args.preset, (1, 3, args.image_size, args.image_size), args.model)
    grid = build_grid(args.workers, "workers-within-node")
    rows = {mode: measure(mode, args.model, base, plan, grid, args.batch, args.image_size, 1000)
            for mode in ("ddp", "fsdp")}
    rows["fsdp"]["activations"] = rows["ddp"]["activations"]  # the same sub-network computes the same tensors
    queue.put((rank, grid.coords, rows))
    dist.barrier()
    dist.destroy_process_group()


def totals(row: dict) -> dict:
    state = row["params"] + row["grads"] + row["optimizer_state"]
    return {"state": state, "total": state + row["buffers"] + row["plain_copy"] + row["full_model"]
            + row["activations"] + row["fsdp_unsharded"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--workers", type=int, default=2, help="S")
    ap.add_argument("--replicas", type=int, default=2, help="D")
    ap.add_argument("--batch", type=int, default=128, help="batch per rank")
    ap.add_argument("--image_size", type=int, default=32)
    ap.add_argument("--preset", default="all")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "fsdp_memory.json"))
    args = ap.parse_args()
    if args.replicas < 2:
        ap.error("--replicas must be >= 2: with D = 1 there is nothing to shard")
    t0 = time.time()
    world = args.workers * args.replicas
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = []
    while len(got) < world:  # a rank that dies before reporting must end the run, not hang it
        if not queue.empty():
            got.append(queue.get())
        elif any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            raise SystemExit(f"a rank exited with code {[p.exitcode for p in procs]} before reporting (its "
                             "traceback is above)")
        else:
            time.sleep(0.05)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a rank exited with code {p.exitcode}")
    results = {rank: {"coords": coords, **rows} for rank, coords, rows in sorted(got, key=lambda t: t[0])}
    table = []
    for rank, r in results.items():
        ddp, fsdp = totals(r["ddp"]), totals(r["fsdp"])
        table.append({"rank": rank, "coords": r["coords"], "ddp": ddp, "fsdp": fsdp,
                      "state_ratio": fsdp["state"] / ddp["state"], "total_ratio": fsdp["total"] / ddp["total"],
                      "sync_ratio": r["fsdp"]["comm"]["sync"] / r["ddp"]["comm"]["sync"],
                      "shard_gather_mib": r["fsdp"]["comm"].get("shard_gather", 0.0) / MIB})
    out = {"model": args.model, "workers": args.workers, "replicas": args.replicas, "batch": args.batch,
           "image_size": args.image_size, "preset": args.preset, "ranks": results, "table": table,
           "state_ratio_max": max(t["state_ratio"] for t in table),
           "total_ratio_max": max(t["total_ratio"] for t in table),
           "sync_ratio_max": max(t["sync_ratio"] for t in table),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": platform.platform(),
           "torch": torch.__version__, "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{args.model}, S={args.workers} x D={args.replicas}, preset {args.preset}, batch {args.batch} per rank, "
          f"{args.image_size}x{args.image_size}; per rank, MiB (ddp -> fsdp)")
    parts = ("params", "grads", "optimizer_state", "buffers", "plain_copy", "full_model", "activations",
             "fsdp_unsharded")
    for rank, r in results.items():
        cells = ", ".join(f"{k} {r['ddp'][k] / MIB:.1f} -> {r['fsdp'][k] / MIB:.1f}" for k in parts)
        print(f"rank {rank} {tuple(r['coords'])}: {cells}")
    for t in table:
        print(f"rank {t['rank']}: params + grads + optimizer fsdp/ddp {t['state_ratio']:.4f}; total "
              f"{t['total_ratio']:.4f} ({t['fsdp']['total'] / MIB:.0f} / {t['ddp']['total'] / MIB:.0f} MiB); sync "
              f"{t['sync_ratio']:.4f}; shard_gather {t['shard_gather_mib']:.1f} MiB")
    print(f"written to {args.output} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
