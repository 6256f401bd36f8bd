"""The node-aware grid: layouts of (worker, replica) coordinates over nodes, the intra/inter-node split
of the analytic communication count, and two "nodes" on one machine (two torchrun launches on loopback).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port, launcher

from loft_ext.parallel import analytic
from loft_ext.parallel.grid import GridError, node_key, plan_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------- layouts (fast)
def test_replicas_within_node_keeps_each_workers_replicas_on_one_node():
    layout = plan_layout(["a", "a", "b", "b"], workers=2)  # auto on two nodes
    assert layout.order == "replicas-within-node"
    assert layout.coords == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.data_ranks(0) == [0, 1] and layout.data_ranks(1) == [2, 3]
    assert layout.filter_ranks(0) == [0, 2] and layout.filter_ranks(1) == [1, 3]
    assert not layout.replica_crosses and layout.filter_crosses
    assert layout.describe() == "2 nodes x 2 processes, replicas-within-node: filter (S) axis crosses nodes"


def test_workers_within_node_is_the_single_node_order_and_can_be_forced():
    one = plan_layout([0] * 4, workers=2)  # one node: rank r = worker r % S of replica r // S, as before
    assert one.order == "workers-within-node" and one.coords == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert one.describe() == "1 node x 4 processes, workers-within-node: no axis crosses nodes"
    forced = plan_layout([0, 0, 1, 1], workers=2, order="workers-within-node")
    assert forced.coords == one.coords
    assert forced.replica_crosses and not forced.filter_crosses
    assert forced.describe().endswith("workers-within-node: replica (D) axis crosses nodes")


def test_layouts_that_cannot_keep_replicas_on_a_node_say_so():
    # D=4 does not divide 2 processes per node: replicas cross whatever the order
    layout = plan_layout([0, 0, 1, 1], workers=1)
    assert layout.replica_crosses and layout.describe().endswith("replica (D) axis crosses nodes")
    # 2 nodes x 3 processes, S=2, D=3: each node holds one worker's three replicas
    layout = plan_layout([0, 0, 0, 1, 1, 1], workers=2)
    assert layout.data_ranks(1) == [3, 4, 5] and not layout.replica_crosses
    # every group lists its ranks in coordinate order (the collectives' ring and gather order)
    for nodes, s in (([0] * 6, 3), ([0, 0, 1, 1, 2, 2], 3), ([0, 0, 0, 0, 1, 1, 1, 1], 2)):
        for order in ("replicas-within-node", "workers-within-node"):
            lay = plan_layout(nodes, s, order)
            assert all(lay.filter_ranks(d) == sorted(lay.filter_ranks(d)) for d in range(lay.replicas))
            assert all(lay.data_ranks(w) == sorted(lay.data_ranks(w)) for w in range(s))
            assert sorted(lay.coords) == [(w, d) for w in range(s) for d in range(lay.replicas)]
    with pytest.raises(GridError, match="not a multiple of S=3"):
        plan_layout([0, 0, 1, 1], workers=3)
    with pytest.raises(GridError, match="--grid_order must be one of"):
        plan_layout([0, 0], workers=2, order="diagonal")


def test_node_key_reads_the_launchers_variables():
    assert node_key({"GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == "GROUP_RANK=1"  # torchrun, accelerate
    assert node_key({"CROSS_RANK": "3", "LOCAL_SIZE": "8"}) == "CROSS_RANK=3"  # deepspeed launcher
    assert node_key({}).startswith("host=")


def test_analytic_inter_node_bytes_of_both_layouts(model_cache):
    """resnet18, S=2 x D=2 on 2 nodes x 2: replicas within a node move no gradient byte across nodes."""
    from loft_ext.partition.plan import make_plan

    model = model_cache("resnet18")
    plan = make_plan(model, 2, "paper", (1, 3, 32, 32), "resnet18")
    counts = {}
    for order in ("replicas-within-node", "workers-within-node"):
        layout = plan_layout([0, 0, 1, 1], 2, order)
        counts[order] = [analytic.rank_bytes(model, plan, layout, r, "allgather", rounds=3, steps=12, elem=4)
                         for r in range(4)]
    near, far = counts["replicas-within-node"], counts["workers-within-node"]
    for r in range(4):
        for c in (near[r], far[r]):  # the layout moves bytes between links, never changes their total
            assert c["sync"]["bytes_sent"] == near[0]["sync"]["bytes_sent"]
            assert c["dp_grad"]["bytes_sent"] == near[0]["dp_grad"]["bytes_sent"] > 0
        assert near[r]["dp_grad"]["inter_node_bytes_sent"] == 0
    # workers-within-node: every rank's replica ring crosses nodes at every step
    assert all(far[r]["dp_grad"]["inter_node_bytes_sent"] == far[r]["dp_grad"]["bytes_sent"] for r in range(4))
    inter = {k: sum(c["sync"]["inter_node_bytes_sent"] + c["dp_grad"]["inter_node_bytes_sent"] for c in v)
             for k, v in counts.items()}
    assert inter["replicas-within-node"] < 0.5 * inter["workers-within-node"]


# ------------------------------------------------------------------- two nodes on loopback (one scenario)
def _node(node_rank: int, port: int, args, out, log):
    cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), RECIPE, *args, "--output_dir", str(out)]
    return subprocess.Popen(cmd, stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"), env=ENV,
                            cwd=ROOT, start_new_session=True)


def _kill_node(proc) -> None:
    """The node is lost: its launcher and the worker processes it started (each in its own session)."""
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    children.append(int(pid))
        except (OSError, IndexError, ValueError):
            pass
    for pid in [proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run_dir(out):
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def _lines(run_dir, rank, key):
    return [json.loads(x)[key] for x in (run_dir / f"hashes-rank{rank}.jsonl").read_text().splitlines()
            if key in json.loads(x)]


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_node_lose_a_node_and_resume(tmp_path):
    from loft_ext.checkpoint import CheckpointStore

    timeout = 20
    # alltoall: the sync counts direct all-to-all bytes, the shared and replica all-reduces ring bytes
    args = ["--model", "regnetx_002", "--workers", "2", "--sync", "alltoall", "--rounds", "4", "--local_steps", "2",
            "--batch_size", "16", "--preset", "all",
            "--bn_recalibration_batches", "1", "--debug_hashes", "--ratios", "", "--checkpoint_every", "1",
            "--collective_timeout", str(timeout), "--distance_layers", "none", "--earlybird", "false"]
    t0 = time.time()
    # the reference: one node, 4 processes, the same grid coordinates the two nodes get
    ref = subprocess.run([*launcher("torchrun", 4), RECIPE, *args,
                          "--grid_order", "replicas-within-node", "--output_dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "4 processes = S=2 x D=2 (alltoall, gloo)" in ref.stdout
    assert "; grid on 1 node x 4 processes, replicas-within-node: no axis crosses nodes" in ref.stdout
    one = _run_dir(tmp_path / "one")
    t1 = time.time()

    # two nodes; node 1 is lost after the first checkpoint
    two = tmp_path / "two"
    port = free_port()
    nodes = [_node(n, port, args, two, tmp_path / f"first{n}") for n in (0, 1)]
    deadline = time.time() + 300
    while time.time() < deadline and not (two.exists() and any(two.iterdir())
                                          and CheckpointStore(str(_run_dir(two) / "checkpoints")).complete()):
        assert nodes[0].poll() is None and nodes[1].poll() is None, (tmp_path / "first0.err").read_text()[-3000:]
        time.sleep(0.05)
    lost = time.time()
    _kill_node(nodes[1])
    assert nodes[0].wait(timeout=timeout + 60) != 0
    ended = time.time() - lost
    err = (tmp_path / "first0.err").read_text()
    assert "a collective failed in round" in err and "rerun the same command with --resume latest" in err, err[-3000:]
    assert ended < timeout + 30, ended  # the collective timeout, plus torchrun's teardown of the other rank
    first = (tmp_path / "first0.out").read_text()
    assert "4 processes = S=2 x D=2 (alltoall, gloo)" in first
    assert "; grid on 2 nodes x 2 processes, replicas-within-node: filter (S) axis crosses nodes" in first
    run_dir = _run_dir(two)
    assert not (run_dir / "summary.json").exists()
    resumed_at = int(json.loads((run_dir / "checkpoints" / CheckpointStore(str(run_dir / "checkpoints")).complete()[-1]
                                 / "state.json").read_text())["round"])
    assert 1 <= resumed_at < 4

    t2 = time.time()
    # both nodes rerun the same command with --resume latest
    port = free_port()
    nodes = [_node(n, port, args + ["--resume", "latest"], two, tmp_path / f"again{n}") for n in (0, 1)]
    for n, proc in enumerate(nodes):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"again{n}.err").read_text()[-3000:]
    print(f"reference {t1 - t0:.1f}s, two nodes until the loss {lost - t1:.1f}s, other node ended after "
          f"{ended:.1f}s, resume {time.time() - t2:.1f}s")
    assert f"resuming from {run_dir}/checkpoints/round_{resumed_at:06d}" in (tmp_path / "again0.out").read_text()

    # bit for bit: final weights, every remaining round's assembled model, every step's sub-networks
    assert (run_dir / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k != "wall_s"}
    assert summary == {k: v for k, v in json.loads((one / "summary.json").read_text()).items() if k != "wall_s"}
    for rank in range(4):
        assert _lines(run_dir, rank, "assembled") == _lines(one, rank, "assembled")[resumed_at:]
        assert _lines(run_dir, rank, "subnet") == _lines(one, rank, "subnet")[2 * resumed_at:]
        two_report = json.loads((run_dir / f"comm-rank{rank}.json").read_text())
        one_report = json.loads((one / f"comm-rank{rank}.json").read_text())
        assert (two_report["worker"], two_report["replica"]) == (one_report["worker"], one_report["replica"]) \
            == (rank // 2, rank % 2)
        assert two_report["nodes"] == [0, 0, 1, 1] and one_report["nodes"] == [0, 0, 0, 0]
        # inter-node counters equal the analytic count (a resumed run restored them from the checkpoint)
        for phase in ("sync", "dp_grad"):
            measured, counted = two_report["measured"][phase], two_report["analytic"][phase]
            for key in ("bytes_sent", "bytes_received", "inter_node_bytes_sent", "inter_node_bytes_received"):
                assert measured[key] == pytest.approx(counted[key], rel=1e-9, abs=0), (rank, phase, key)
            assert one_report["measured"][phase]["inter_node_bytes_sent"] == 0
        assert two_report["measured"]["dp_grad"]["inter_node_bytes_sent"] == 0  # replicas share a node
        assert two_report["measured"]["sync"]["inter_node_bytes_sent"] > 0  # the filter axis crosses
