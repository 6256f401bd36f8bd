"""The one 4-process (S=2 x D=2) gloo job behind tests/test_fsdp.py: every rank writes what it saw to
``<out>/rank<r>.json`` and the test asserts on the four files.

1. The DeviceMesh of both grid orders holds the grid's ranks (filter and shard/replica sub-meshes).
2. The same LoFT rounds with DDP replicas and with FSDP replicas (same grid, seed, batches): the assembled
   models, the per-rank parameter + gradient + optimizer-state bytes of the training module, and the
   measured sync bytes next to the analytic count.
3. Resume at a round boundary: a fresh FSDP engine built from the assembled model after round k and
   trained for the remaining rounds ends where the uninterrupted FSDP run ends (what a checkpoint holds
   under ``--optimizer_state reset`` is the full model).
4. ``--optimizer_state carry`` under both strategies: FSDP replicas equal DDP replicas, every phase equals
   the analytic count, and a resume after round 1 (assembled model + the strategy's saved tensors) is exact.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import get_process_group_ranks

from loft_ext.engine.loft import LoFTEngine
from loft_ext.engine.loop import local_step
from loft_ext.models import create_model
from loft_ext.parallel import analytic
from loft_ext.parallel.grid import build_grid
from loft_ext.parallel.mesh import build_mesh
from loft_ext.parallel.sharded import training_state_bytes
from loft_ext.partition.plan import make_plan
from loft_ext.tickets.plugins import draw_ticket

MODEL, SHAPE, BATCH, ROUNDS, STEPS = "resnet10t", (1, 3, 32, 32), 8, 3, 2


def check_mesh(order: str) -> dict:
    grid = build_grid(2, order)
    out = {}
    for mode, dim in (("fsdp", "shard"), ("ddp", "replica")):
        mesh = build_mesh(grid, mode)
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total, group=mesh.get_group(dim))  # the sub-mesh's group really holds these ranks
        out[mode] = {
            "names": list(mesh.mesh_dim_names),
            "filter_ranks": get_process_group_ranks(mesh.get_group("filter")),
            "replica_ranks": get_process_group_ranks(mesh.get_group(dim)),
            "filter_mesh": mesh["filter"].mesh.tolist(), "replica_mesh": mesh[dim].mesh.tolist(),
            "coordinate": list(mesh.get_coordinate()), "replica_sum": total.item(),
        }
    return {**out, "grid_filter_ranks": get_process_group_ranks(grid.filter_group),
            "grid_data_ranks": get_process_group_ranks(grid.data_group), "coords": list(grid.coords)}


def batch(worker: int, replica: int, round_index: int, step: int):
    g = torch.Generator().manual_seed(1000 * round_index + 100 * step + 10 * worker + replica)
    return torch.randn(BATCH, *SHAPE[1:], generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def train(base, plan, grid, replicas: str, start: int = 0, stop: int = ROUNDS, record_bytes: bool = False,
          mixed_precision: str = "no", strategy: str = "allgather", optimizer_state: str = "reset",
          carried: dict | None = None):
    """LoFT rounds [start, stop) from ``base``; ``carried``: the strategy's saved tensors to resume from
    (its ``state_dict()`` after round start - 1, which the returned info holds as ``carried``)."""
    model = create_model(MODEL, 10)
    model.load_state_dict(base.state_dict())
    engine = LoFTEngine(model, plan, seed=0, grid=grid, replicas=replicas, start_round=start,
                        mixed_precision=mixed_precision, strategy=strategy, optimizer_state=optimizer_state,
                        make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4))
    if carried is not None:
        engine.strategy.load_state_dict(carried)
    w = engine.workers[0]
    state_bytes = None
    for r in range(start, stop):
        engine.begin_round(r)
        for k in range(STEPS):
            local_step(w, *batch(w.index, grid.data_index, r, k))
        if record_bytes and state_bytes is None:  # after a step: gradients and momentum exist
            state_bytes = training_state_bytes(w.module, w.optimizer)
        engine.sync()
    full = {k: v.detach().clone() for k, v in engine.assembled().state_dict().items()}
    elem = next(model.parameters()).element_size()
    expected = analytic.rank_bytes(model, plan, grid.layout, grid.rank, strategy, stop - start,
                                   (stop - start) * STEPS, elem, 1 if optimizer_state == "carry" else 0,
                                   sharded=replicas == "fsdp", draw=lambda k: engine.draw(start + k))
    measured = {phase: c.sent for phase, c in engine.comm.counters.items()}
    return full, {"state_bytes": state_bytes, "measured_phases": measured, "strategy": type(engine.strategy).__name__,
                  "analytic_phases": {k: v["bytes_sent"] for k, v in expected.items() if k != "dp_grad"},
                  "carried": {k: v.clone() for k, v in engine.strategy.state_dict().items()}}


def ticket_units(model) -> list[list[int]]:
    """The units a structured ticket at r = 0.5 keeps (the recipe's default ticket)."""
    return [k.tolist() for k in draw_ticket(model, 0.5, input_shape=SHAPE, preset="all").structured.kept]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    result = {"mesh": {order: check_mesh(order) for order in ("workers-within-node", "replicas-within-node")}}
    torch.manual_seed(0)
    base = create_model(MODEL, 10)
    plan = make_plan(base, 2, "all", SHAPE, MODEL)
    grid = build_grid(2, "workers-within-node")
    ddp, ddp_info = train(base, plan, grid, "ddp", record_bytes=True)
    fsdp, fsdp_info = train(base, plan, grid, "fsdp", record_bytes=True)
    # resume after round 1 from the assembled model alone (what the recipe's checkpoint holds)
    first, _ = train(base, plan, grid, "fsdp", stop=1)
    resumed_base = create_model(MODEL, 10)
    resumed_base.load_state_dict(first)
    resumed, _ = train(resumed_base, plan, grid, "fsdp", start=1)
    floats = [k for k, v in ddp.items() if v.is_floating_point()]
    # the bf16 policy (--mixed_precision bf16): BatchNorms keep fp32 parameters (torch's batch_norm needs them
    # in the dtype of the running statistics), the rest computes in bf16
    bf16, _ = train(base, plan, grid, "fsdp", stop=1, mixed_precision="bf16")
    # --sync alltoall: replica d sends chunk d of each peer's part; the same models as DDP replicas
    a2a = {mode: train(base, plan, grid, mode, stop=2, strategy="alltoall") for mode in ("ddp", "fsdp")}
    result["alltoall"] = {mode: {k: v for k, v in info.items() if k != "carried"} for mode, (_, info) in a2a.items()}
    result["alltoall_bit_identical"] = all(torch.equal(a2a["ddp"][0][k], a2a["fsdp"][0][k]) for k in a2a["ddp"][0])
    # --optimizer_state carry: the momentum is sharded like its parameter and moves with it (both strategies);
    # a resume after round 1 from the assembled model and the strategy's saved state ends where the whole run does
    carry = {}
    for strategy in ("allgather", "alltoall"):
        runs = {mode: train(base, plan, grid, mode, strategy=strategy, optimizer_state="carry") for mode in ("ddp", "fsdp")}
        head, head_info = train(base, plan, grid, "fsdp", stop=1, strategy=strategy, optimizer_state="carry")
        head_model = create_model(MODEL, 10)
        head_model.load_state_dict(head)
        tail, _ = train(head_model, plan, grid, "fsdp", start=1, strategy=strategy, optimizer_state="carry",
                        carried=head_info["carried"])
        reset = a2a["fsdp"][0] if strategy == "alltoall" else fsdp
        carry[strategy] = {
            "bit_identical": all(torch.equal(runs["ddp"][0][k], runs["fsdp"][0][k]) for k in runs["ddp"][0]),
            "resume_bit_identical": all(torch.equal(tail[k], runs["fsdp"][0][k]) for k in tail),
            "differs_from_reset": max((runs["fsdp"][0][k] - reset[k]).abs().max().item() for k in floats)
            if strategy == "allgather" else None,
            "carried_keys": sorted({k.split("|")[2] for k in head_info["carried"]}),
            **{mode: {k: v for k, v in info.items() if k != "carried"} for mode, (_, info) in runs.items()}}
    result["carry"] = carry
    result["bf16_finite"] = all(bool(torch.isfinite(bf16[k]).all()) for k in floats)
    result["bf16_moved"] = max((bf16[k] - base.state_dict()[k]).abs().max().item() for k in floats)

    def as_model(state):
        m = create_model(MODEL, 10)
        m.load_state_dict(state)
        return m
    result.update({
        "tickets_identical": ticket_units(as_model(ddp)) == ticket_units(as_model(fsdp)),
        "max_rel_diff": max(((ddp[k] - fsdp[k]).abs() / ddp[k].abs().clamp_min(1e-6)).max().item() for k in floats),
        "ddp": {k: v for k, v in ddp_info.items() if k != "carried"},
        "fsdp": {k: v for k, v in fsdp_info.items() if k != "carried"},
        "max_abs_diff": max((ddp[k] - fsdp[k]).abs().max().item() for k in floats),
        "bit_identical": all(torch.equal(ddp[k], fsdp[k]) for k in ddp),
        "moved": max((ddp[k] - base.state_dict()[k]).abs().max().item() for k in floats),
        "resume_max_abs_diff": max((resumed[k] - fsdp[k]).abs().max().item() for k in floats),
        "resume_bit_identical": all(torch.equal(resumed[k], fsdp[k]) for k in fsdp),
        "coords": list(grid.coords),
    })
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
