"""Distributed LoFT on real gloo processes launched by torchrun and accelerate launch.

Each launch runs recipes/loft_timm.py; the debug mode writes the assembled model's hash after every
round (and each rank's sub-network hash after every step), and every rank writes its measured and
analytic communication.
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import check_pretrain_bytes, free_port
from conftest import launcher as launcher_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1"}
FAST = ["--rounds", "3", "--local_steps", "2", "--batch_size", "32", "--bn_recalibration_batches", "1",
        "--preset", "all", "--debug_hashes", "--ratios", ""]

pytestmark = pytest.mark.slow


def _launch(launcher, nproc, args, out):
    if launcher in ("torchrun", "accelerate"):
        cmd = launcher_cmd(launcher, nproc) + [RECIPE]
        env = {**ENV, "ACCELERATE_USE_CPU": "1"} if launcher == "accelerate" else ENV
    else:
        cmd, env = [sys.executable, RECIPE], ENV
    proc = subprocess.run(cmd + args + ["--output_dir", str(out)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    return proc


def _run_dir(out):
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def _assembled(run_dir, rank=0):
    lines = [json.loads(x) for x in (run_dir / f"hashes-rank{rank}.jsonl").read_text().splitlines()]
    return [x["assembled"] for x in lines if "assembled" in x]


def _comm(run_dir, rank):
    return json.loads((run_dir / f"comm-rank{rank}.json").read_text())


def _check_counts(report):
    measured, analytic = report["measured"]["sync"], report["analytic"]["sync"]
    for key in ("bytes_sent", "bytes_received"):
        assert abs(measured[key] - analytic[key]) <= 0.01 * analytic[key], (key, measured, analytic)
    return measured["bytes_sent"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    proc = _launch("python", 1, FAST, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 process, workers simulated" in proc.stdout
    return _assembled(_run_dir(out))


@pytest.mark.parametrize("strategy", ["allgather", "alltoall"])
def test_two_processes_equal_the_simulation_bit_for_bit(tmp_path, simulated, strategy):
    proc = _launch("torchrun", 2, FAST + ["--sync", strategy], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 processes = S=2 x D=1 ({strategy}, gloo)" in proc.stdout
    run_dir = _run_dir(tmp_path)
    # S=2: the mean of two values is the same whichever rank adds first, so bit-identical
    assert _assembled(run_dir, 0) == _assembled(run_dir, 1) == simulated
    assert len(simulated) == 3
    for rank in (0, 1):
        _check_counts(_comm(run_dir, rank))


def test_channels_last_on_augmented_data_two_processes_equal_the_simulation(tmp_path):
    """--channels_last and random crops / flips (imagefolder, seeded per sample) keep the invariant:
    2 ranks with a loader process each (alltoall) train exactly as 2 workers simulated in one process;
    then a ticket is pruned and fine-tuned in channels_last."""
    from conftest import write_noise_imagefolder
    args = FAST + ["--dataset", "imagefolder", "--data_dir", str(write_noise_imagefolder(tmp_path / "data")),
                   "--image_size", "16", "--batch_size", "8", "--channels_last", "--sync", "alltoall"]
    sim = _launch("python", 1, args, tmp_path / "sim")
    assert sim.returncode == 0, sim.stderr[-3000:]
    ranks = _launch("torchrun", 2, args + ["--data_workers", "1", "--ratios", "0.5", "--finetune_epochs", "1",
                                           "--finetune_batch_size", "8"], tmp_path / "ranks")
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "(alltoall, gloo); channels_last; run dir" in ranks.stdout
    sim_dir, ranks_dir = _run_dir(tmp_path / "sim"), _run_dir(tmp_path / "ranks")
    assert len(_assembled(sim_dir)) == 3
    assert _assembled(ranks_dir, 0) == _assembled(ranks_dir, 1) == _assembled(sim_dir)
    (row,) = json.loads((ranks_dir / "summary.json").read_text())["ticket_rows"]
    assert row["kept_params"] < row["params"] and 0 < row["test_acc"] <= 1


def test_four_workers_alltoall_moves_under_a_third_of_allgather(tmp_path):
    sent, hashes = {}, {}
    for strategy in ("allgather", "alltoall"):
        out = tmp_path / strategy
        proc = _launch("torchrun", 4, FAST + ["--workers", "4", "--sync", strategy, "--rounds", "2"], out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = _run_dir(out)
        sent[strategy] = [_check_counts(_comm(run_dir, r)) for r in range(4)]
        hashes[strategy] = [_assembled(run_dir, r) for r in range(4)]
        assert all(h == hashes[strategy][0] for h in hashes[strategy])  # every rank, every round
    # same assembled model after every round, by a different route
    assert hashes["allgather"][0] == hashes["alltoall"][0]
    ratio = max(sent["alltoall"]) / min(sent["allgather"])
    assert ratio <= 0.3, ratio


def test_replicas_stay_identical_and_workers_differ(tmp_path):
    # one ticket, evaluated untrained (--finetune_epochs 0), for the ticket table's byte count
    proc = _launch("torchrun", 4, FAST + ["--workers", "2", "--rounds", "2", "--ratios", "0.5",
                                          "--finetune_epochs", "0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 processes = S=2 x D=2" in proc.stdout
    run_dir = _run_dir(tmp_path)

    def steps(rank, directory=run_dir):
        lines = [json.loads(x) for x in (directory / f"hashes-rank{rank}.jsonl").read_text().splitlines()]
        return [x["subnet"] for x in lines if "subnet" in x]

    # ranks 0 and 2 are worker 0's replicas, 1 and 3 worker 1's (rank = d * S + s)
    assert steps(0) == steps(2) and steps(1) == steps(3)
    assert len(steps(0)) == 4
    assert all(a != b for a, b in zip(steps(0), steps(1)))
    assert _assembled(run_dir, 0) == _assembled(run_dir, 3)
    report = _comm(run_dir, 0)
    _check_counts(report)
    dp = report["measured"]["dp_grad"]
    # DDP all-reduces in buckets (one or more per step; it rebuilds them after the first step): the bytes
    # equal the analytic count of one all-reduce of every gradient per step
    assert dp["calls"] >= 4 and dp["bytes_sent"] == pytest.approx(report["analytic"]["dp_grad"]["bytes_sent"])
    # LoFT S=2 D=2: pre MiB counts the replicas' gradients next to the sync
    (row,) = json.loads((run_dir / "summary.json").read_text())["ticket_rows"]
    phases = check_pretrain_bytes(run_dir, row, proc.stdout)
    assert phases["dp_grad"] == dp["bytes_sent"] and phases["sync"] == report["measured"]["sync"]["bytes_sent"]
    assert (row["samples_per_worker"], row["samples_total"]) == (2 * 2 * 32, 4 * 2 * 2 * 32)

    # the same run with FSDP2-sharded replicas, launched by accelerate with the shipped FSDP config (it means
    # --replicas fsdp; tests/test_fsdp.py runs the torchrun --replicas fsdp engine), assembles the same models
    # bit for bit: with D = 2 the reduce-scatter's sum of two gradients does not depend on order and its halving
    # is exact, and with S = 2 the sync's means are sums of two values whatever the shard layout
    fsdp_out = tmp_path / "fsdp"
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", "fsdp2_cpu.yaml"), "--main_process_port", str(free_port()), RECIPE]
    proc = subprocess.run(cmd + FAST + ["--workers", "2", "--rounds", "2", "--ratios", "0.5", "--finetune_epochs", "0",
                                        "--output_dir", str(fsdp_out)], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 processes = S=2 x D=2" in proc.stdout and "FSDP replicas" in proc.stdout
    fsdp_dir = _run_dir(fsdp_out)
    assert fsdp_dir.name == run_dir.name  # the replica mode is an execution choice, not part of the run's hash
    for rank in range(4):
        assert _assembled(fsdp_dir, rank) == _assembled(run_dir, 0)
        assert steps(rank, fsdp_dir) == steps(rank)  # every step's whole sub-network (gathered from the shards)
    (fsdp_row,) = json.loads((fsdp_dir / "summary.json").read_text())["ticket_rows"]
    assert fsdp_row["kept_params"] == row["kept_params"] and fsdp_row["test_acc"] == row["test_acc"]  # the same ticket
    fsdp_report = _comm(fsdp_dir, 0)
    # the filter axis moves shards: the sync is 1/D of the DDP replicas' (within 2%), equal to its analytic count;
    # the shards meet over the data group (shard_gather), also counted and equal to the analytic count
    sync = _check_counts(fsdp_report)
    assert abs(sync / report["measured"]["sync"]["bytes_sent"] - 0.5) <= 0.01
    gathered, expected = fsdp_report["measured"]["shard_gather"], fsdp_report["analytic"]["shard_gather"]
    assert gathered["bytes_sent"] == pytest.approx(expected["bytes_sent"])
    assert "dp_grad" not in fsdp_report["measured"] and fsdp_report["fsdp_analytic"]["bytes_sent"] > 0


def test_dense_on_two_processes_is_data_parallel_and_the_table_counts_its_gradients(tmp_path):
    """--method dense on 2 processes: S=1 x D=2, a global batch of 2 x 32 and half the steps per epoch;
    its traffic is the gradient all-reduce, and the table (and compare_runs) shows all of it."""
    proc = _launch("torchrun", 2, FAST + ["--method", "dense", "--rounds", "2", "--ratios", "0.5", "--finetune_epochs",
                                          "0", "--image_size", "16", "--distance_layers", "none",
                                          "--earlybird", "false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # digits: 1437 training samples; each replica takes 718 of them, 22 batches of 32 (one process: 44)
    assert "S=1 L=2 rounds=2 (11/epoch); 2 processes = S=1 x D=2" in proc.stdout
    run_dir = _run_dir(tmp_path)
    (row,) = json.loads((run_dir / "summary.json").read_text())["ticket_rows"]
    phases = check_pretrain_bytes(run_dir, row, proc.stdout)
    report = _comm(run_dir, 0)
    assert phases["dp_grad"] == pytest.approx(report["analytic"]["dp_grad"]["bytes_sent"])
    assert phases["dp_grad"] > 0.9 * row["pretrain_bytes"]  # the sync phase alone said almost nothing
    assert (row["samples_per_worker"], row["samples_total"]) == (2 * 2 * 32, 2 * 2 * 2 * 32)
    table = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "compare_runs.py"), str(run_dir)],
                           capture_output=True, text=True, cwd=ROOT, env=ENV)
    header, line = table.stdout.splitlines()[:2]
    assert "samples/wkr" in header and line.split()[:6] == ["dense", "resnet18", "1", "2", "0.18", "128"]
    assert line.split()[6] == "256"
    check_pretrain_bytes(run_dir, row, table.stdout)


def test_accelerate_launch_trains(tmp_path, monkeypatch):
    monkeypatch.setitem(ENV, "WANDB_MODE", "offline")  # the tracker on the main process of a real group
    args = ["--epochs", "2", "--local_steps", "4", "--bn_recalibration_batches", "2", "--ratios", ""]
    proc = _launch("accelerate", 2, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes = S=2 x D=1 (allgather, gloo)" in proc.stdout
    metrics = [json.loads(x) for x in (_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert max(metrics[1]["worker_loss"]) < min(metrics[0]["worker_loss"])
    assert metrics[1]["test_acc"] > 0.8
    assert list((_run_dir(tmp_path) / "wandb").glob("offline-run-*/run-*.wandb"))


def test_uneven_split_on_three_processes(tmp_path):
    # resnet18's hidden widths (64..512) do not divide by 3: workers hold 22/21/21 ... units
    hashes = {}
    for strategy in ("allgather", "alltoall"):
        out = tmp_path / strategy
        proc = _launch("torchrun", 3, FAST + ["--workers", "3", "--sync", strategy, "--rounds", "2"], out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = _run_dir(out)
        hashes[strategy] = [_assembled(run_dir, r) for r in range(3)]
        assert hashes[strategy][0] == hashes[strategy][1] == hashes[strategy][2]
        for r in range(3):
            _check_counts(_comm(run_dir, r))
    assert hashes["allgather"][0] == hashes["alltoall"][0]
