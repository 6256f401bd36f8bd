"""Checkpoints, resume, preemption, lost ranks and non-finite values (docs/reliability.md).

Resumed runs are compared with uninterrupted ones byte for byte: the final model file, every line of
metrics.jsonl and rounds.jsonl, and summary.json except its wall time.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port, launcher, shm_left_behind

from loft_ext.checkpoint import CheckpointError, CheckpointStore, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1"}
sys.path.insert(0, os.path.join(ROOT, "recipes"))

from loft_timm import main  # noqa: E402

# 44 steps per epoch at batch 32 and L=3: 15 rounds per epoch, so 18 rounds cross an epoch end
RUN = ["--rounds", "18", "--local_steps", "3", "--batch_size", "32", "--bn_recalibration_batches", "2",
       "--ratios", "", "--distance_every", "2", "--earlybird_every", "2", "--image_size", "16"]


def _run_dir(out):
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def _same_run(a, b, same_world=True):
    """Two finished run directories hold the same model, logs and summary (wall time aside; bytes sent
    too when one of them simulated the workers in one process, which sends nothing)."""
    a, b = _run_dir(a), _run_dir(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    skip = {"wall_s"} if same_world else {"wall_s", "bytes_sent", "sync_bytes_sent", "pretrain_bytes",
                                          "pretrain_bytes_by_phase"}

    def lines(path):
        return [{k: v for k, v in json.loads(x).items() if k not in skip} for x in path.read_text().splitlines()]

    for log in ("metrics.jsonl", "rounds.jsonl"):
        assert lines(a / log) == lines(b / log), log
    sa, sb = ({k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in skip}
              for d in (a, b))
    assert sa == sb


def _wait_for_rounds(run_root, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list(run_root.glob("*/rounds.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"no {n} rounds within {timeout}s")


# ------------------------------------------------------------------------------ the store itself
def _write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    _write(store.begin("round_000002"), "model.bin", "good")
    good = store.commit("round_000002", {"round": 2})
    staging = store.begin("round_000004")
    _write(staging, "model.bin", "half-writ")  # ... and the process dies before commit
    assert store.complete() == ["round_000002"] and store.latest() == good
    assert verify(good)["meta"] == {"round": 2}
    with pytest.raises(CheckpointError, match="no manifest.json: it is not a complete checkpoint"):
        verify(staging)
    # the next attempt discards the leftover; keep=2 drops the oldest after each commit
    for r in (4, 6):
        _write(store.begin(f"round_{r:06d}"), "model.bin", f"r{r}")
        store.commit(f"round_{r:06d}", {"round": r})
    assert store.complete() == ["round_000004", "round_000006"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".staging")]


def test_truncated_or_corrupt_files_are_named(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _write(store.begin("round_000001"), "a.bin", "0123456789")
    path = store.commit("round_000001", {})
    _write(path, "a.bin", "01234")
    with pytest.raises(CheckpointError, match=r"a.bin' is truncated or changed \(5 bytes, manifest says 10\)"):
        verify(path)
    _write(path, "a.bin", "0123456780")
    with pytest.raises(CheckpointError, match="a.bin' is corrupt"):
        verify(path)


# ------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main([*RUN, "--optimizer_state", "carry", "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_at_round_boundary_and_resume_is_bit_identical(tmp_path, uninterrupted):
    args = [*RUN, "--optimizer_state", "carry", "--checkpoint_every", "-1", "--output_dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, RECIPE, *args], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_rounds(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "received SIGTERM: stopping at the end of this round" in out
    assert "preempted by SIGTERM after round" in err and "--resume latest" in err
    run_dir = _run_dir(tmp_path)
    assert not (run_dir / "summary.json").exists()
    (ckpt,) = CheckpointStore(str(run_dir / "checkpoints")).complete()
    assert 3 <= int(ckpt.split("_")[1]) < 18
    # the same command without --resume refuses to start over the checkpoints
    assert main(args) == 2
    assert main([*args, "--resume", "latest"]) == 0
    _same_run(tmp_path, uninterrupted)


def test_resume_from_the_epoch_end_checkpoint_is_bit_identical(tmp_path, uninterrupted):
    """The uninterrupted run checkpointed at its epoch end (round 15, the default schedule); cut back to
    that checkpoint (as if it died in round 16), it resumes to the same model, logs and summary."""
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    run_dir = _run_dir(tmp_path)
    assert CheckpointStore(str(run_dir / "checkpoints")).complete() == ["round_000015"]
    for name in ("summary.json", "model.safetensors"):
        (run_dir / name).unlink()
    assert main([*RUN, "--optimizer_state", "carry", "--output_dir", str(tmp_path), "--resume", "latest",
                 "--finished_run_checkpoints", "delete"]) == 0
    _same_run(tmp_path, uninterrupted)
    # a finished run's resume checkpoints go when asked (a sweep's disk), its model and logs stay
    assert not (run_dir / "checkpoints").exists() and (run_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Offline W&B: the resumed segment reuses the run id (one run after `wandb sync`) and logs the
    rounds after the checkpoint; the interrupted segment's rounds up to the checkpoint stay its own."""
    from wandb_offline import records
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*RUN, "--rounds", "6", "--checkpoint_every", "2", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    run_dir = _run_dir(tmp_path)
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    # as if the process died in round 5 (the last checkpoint is round 4; a finished run saves no other)
    assert CheckpointStore(str(run_dir / "checkpoints")).complete()[-1] == "round_000004"
    for name in ("summary.json", "model.safetensors"):
        (run_dir / name).unlink()
    assert main([*args, "--resume", "latest"]) == 0
    segments = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*")))
    assert len(segments) == 2 and all(seg.endswith("-" + run_id) for seg in segments)
    steps = []
    for seg in segments:
        (wandb_file,) = glob.glob(os.path.join(seg, "run-*.wandb"))
        runs = [r.run.run_id for r in records(wandb_file) if r.WhichOneof("record_type") == "run"]
        assert runs and set(runs) == {run_id}
        steps.append(sorted({r.history.step.num for r in records(wandb_file)
                             if r.WhichOneof("record_type") == "history"}))
    assert steps[0][:6] == [1, 2, 3, 4, 5, 6]
    assert steps[1][:2] == [5, 6] and min(steps[1]) == 5


def test_non_finite_values_stop_the_run_naming_worker_round_and_layer(tmp_path, capsys):
    # lr x 1e10 after half of the 8 rounds: rounds 1-4 train, round 5 diverges
    args = ["--rounds", "8", "--local_steps", "3", "--batch_size", "32", "--ratios", "", "--checkpoint_every", "2",
            "--lr_milestones", "0.5", "--lr_gamma", "1e10", "--output_dir", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite values in round 5, worker 0: loss nan at local step")
    assert "first non-finite tensor: conv1.weight" in err
    run_dir = _run_dir(tmp_path)
    assert f"Last good checkpoint: {run_dir}/checkpoints/round_000004" in err
    assert CheckpointStore(str(run_dir / "checkpoints")).complete() == ["round_000002", "round_000004"]
    verify(str(run_dir / "checkpoints" / "round_000004"))
    assert not (run_dir / "summary.json").exists()


# ------------------------------------------------------------------------------ lost ranks
KILL = ["--rounds", "16", "--local_steps", "2", "--batch_size", "32", "--bn_recalibration_batches", "1",
        "--preset", "all", "--ratios", "", "--checkpoint_every", "2", "--collective_timeout", "30",
        "--image_size", "16"]


def _launcher(name, nproc):
    return launcher(name, nproc), ({**ENV, "ACCELERATE_USE_CPU": "1"} if name == "accelerate" else ENV)


def _rank_pid(out_dir, local_rank):
    """The pid of the worker process with LOCAL_RANK=local_rank whose command line names out_dir."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if str(out_dir).encode() in cmd and RECIPE.encode() in cmd and f"LOCAL_RANK={local_rank}".encode() in env \
                and not any(b"torchrun" in c or b"accelerate" in c or b"deepspeed" in c for c in cmd[:2]):
            return int(pid)
    raise AssertionError("worker process not found")


def _kill_a_rank(launcher, out, extra=(), nproc=2, started=None):
    """Start the KILL run (or take ``started``), kill -9 local rank 1 after round 3, check what is left."""
    proc = started
    if proc is None:
        cmd, env = _launcher(launcher, nproc)
        proc = subprocess.Popen([*cmd, RECIPE, *KILL, *extra, "--output_dir", str(out)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_rounds(out, 3, proc)
    os.kill(_rank_pid(out, 1), signal.SIGKILL)
    t0 = time.time()
    log, _ = proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode != 0, log
    # mostly within seconds (gloo reports the closed connection); a recv posted after the peer died waits for
    # --collective_timeout 30 (gloo does not see it), and a launcher's SIGTERM that the preemption handler
    # turns into "stop after this round" is followed by its SIGKILL after 30 s: at worst ~30 s, never 1800
    assert took < 50, f"the job took {took:.0f}s to end after the kill"
    run_dir = _run_dir(out)
    latest = CheckpointStore(str(run_dir / "checkpoints")).latest()
    assert latest is not None
    verify(latest)  # every file matches its checksum
    # the model is a sharded DCP checkpoint: every rank wrote its own chunk, none the whole model
    shards = sorted(p.name for p in (run_dir / "checkpoints" / latest / "model").iterdir())
    assert shards == [".metadata"] + [f"__{r}_0.distcp" for r in range(nproc)]
    assert not (run_dir / "checkpoints" / latest / "model.safetensors").exists()
    sizes = [(run_dir / "checkpoints" / latest / "model" / f).stat().st_size for f in shards[1:]]
    whole = (run_dir / "init.safetensors").stat().st_size
    assert all(abs(size / whole - 1 / nproc) < 0.1 / nproc for size in sizes), (sizes, whole)
    return log, run_dir


# carried momentum under ZeRO-1 and ZeRO-3 (ds.ZeroCarriedState: ZeRO-1/2's flat fp32 partitions, ZeRO-3's
# sharded copy): after the resume the optimizer partitions get it back
DS_ZERO3 = ["--deepspeed", "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero3_fp32_cpu.json"),
            "--optimizer_state", "carry"]
DS_ZERO1 = ["--deepspeed", "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero1_fp32_cpu.json"),
            "--optimizer_state", "carry"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher,extra", [
    ("torchrun", ["--sync", "alltoall", "--optimizer_state", "carry"]),
    ("deepspeed", DS_ZERO1),
    ("deepspeed", DS_ZERO3),
], ids=["torchrun-alltoall-carry", "deepspeed-zero1-carry", "deepspeed-zero3-carry"])
def test_kill9_one_rank_then_resume_completes_exactly(tmp_path, launcher, extra):
    log, run_dir = _kill_a_rank(launcher, tmp_path / "killed", extra)
    if launcher == "torchrun":
        assert "a collective failed in round" in log and "rerun the same command with --resume latest" in log
        assert "Signal 9 (SIGKILL) received by PID" in log
    else:  # each worker engine's save_checkpoint: module states per filter worker (mp rank)
        latest = CheckpointStore(str(run_dir / "checkpoints")).latest()
        saved = {p.name for p in (run_dir / "checkpoints" / latest / "deepspeed" / os.path.basename(latest)).iterdir()}
        # (ZeRO-3 names them zero_pp_rank_<replica>_mp_rank_<worker>_model_states.pt, ZeRO-1
        # mp_rank_<worker>_model_states.pt; both beside optimizer partitions)
        for worker in ("00", "01"):
            assert any(name.endswith(f"mp_rank_{worker}_model_states.pt") for name in saved), saved
            assert any(name.endswith(f"mp_rank_{worker}_optim_states.pt") for name in saved), saved
    cmd, env = _launcher(launcher, 2)
    proc = subprocess.run([*cmd, RECIPE, *KILL, *extra, "--output_dir", str(tmp_path / "killed"),
                           "--resume", "latest"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert shm_left_behind(cmd) == []
    # S simulated workers in one process equal S processes (and DeepSpeed ZeRO-3 equals plain LoFT):
    # the uninterrupted reference runs in one process
    plain = ["--batch_size", "64", *extra[3:]] if launcher == "deepspeed" else extra  # the configs' micro batch is 64
    assert main([*KILL, *plain, "--output_dir", str(tmp_path / "reference")]) == 0
    _same_run(tmp_path / "killed", tmp_path / "reference", same_world=False)


FSDP = ["--workers", "2", "--rounds", "10"]


@pytest.mark.slow
def test_kill9_one_rank_under_accelerate_fsdp_then_resume_equals_ddp_replicas(tmp_path, capsys):
    """S=2 x D=2 with FSDP-sharded replicas, launched by accelerate with the shipped FSDP config: a rank
    killed after round 3 ends the job and leaves the round-2 checkpoint (4 DCP shards); torchrun
    ``--replicas fsdp --resume latest`` finishes it, equal bit for bit to an uninterrupted run with DDP
    replicas (D = 2: the reduce-scatter's sum of two gradients and its halving are exact)."""
    cfg = ["--config_file", os.path.join(ROOT, "accelerate_configs", "fsdp2_cpu.yaml")]
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", *cfg,
           "--main_process_port", str(free_port())]
    proc = subprocess.Popen([*cmd, RECIPE, *KILL, *FSDP, "--output_dir", str(tmp_path / "killed")],
                            env={**ENV, "ACCELERATE_USE_CPU": "1"}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log, run_dir = _kill_a_rank(None, tmp_path / "killed", nproc=4, started=proc)
    assert "FSDP replicas" in log and "a collective failed in round" in log and "SIGKILL" in log, log
    assert not (run_dir / "summary.json").exists()
    # DCP could reshard the model, but the run's batches depend on D: one process (D = 1) is refused by name
    latest = CheckpointStore(str(run_dir / "checkpoints")).latest()
    capsys.readouterr()
    assert main([*KILL, *FSDP, "--output_dir", str(tmp_path / "one"), "--resume", latest]) == 2
    assert "was written with replicas=2, this run has replicas=1" in capsys.readouterr().err
    torchrun = launcher("torchrun", 4)
    proc = subprocess.run([*torchrun, RECIPE, *KILL, *FSDP, "--replicas", "fsdp", "--output_dir",
                           str(tmp_path / "killed"), "--resume", "latest"], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "FSDP replicas" in proc.stdout
    proc = subprocess.run([*launcher("torchrun", 4), RECIPE, *KILL, *FSDP, "--output_dir", str(tmp_path / "ddp")],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run(tmp_path / "killed", tmp_path / "ddp", same_world=False)  # FSDP moves other bytes than DDP


def test_only_communication_errors_are_reported_as_a_failed_collective():
    """A dead or late peer becomes one line that says to resume; any other error inside a round (a dtype
    mismatch, a bug) keeps its own traceback instead of being blamed on another rank."""
    import torch.distributed as dist

    from loft_ext.engine.pretrain import communication_failed

    for message in ("[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer [127.0.0.1]:4",
                    "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation",
                    "Read error [127.0.0.1]:5: Connection reset by peer"):
        assert communication_failed(RuntimeError(message))
    assert communication_failed(dist.DistBackendError("NCCL error: unhandled system error"))
    for message in ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same",
                    "mat1 and mat2 shapes cannot be multiplied (64x512 and 256x10)"):
        assert not communication_failed(RuntimeError(message))


def test_same_seed_gives_the_same_tickets_and_metrics_twice(tmp_path):
    args = ["--rounds", "6", "--local_steps", "3", "--batch_size", "32", "--bn_recalibration_batches", "2",
            "--image_size", "16", "--ratios", "0.5,0.8", "--finetune_epochs", "1"]
    for name in ("first", "second"):
        assert main([*args, "--output_dir", str(tmp_path / name)]) == 0
    a, b = _run_dir(tmp_path / "first"), _run_dir(tmp_path / "second")
    assert a.name == b.name
    tickets = sorted(p.name for p in (a / "tickets").iterdir())
    assert len(tickets) == 2 and tickets == sorted(p.name for p in (b / "tickets").iterdir())
    timing = {"pretrain_wall_s", "prune_wall_s", "finetune_wall_s", "latency_ms", "dense_latency_ms", "speedup",
              "dir"}
    for t in tickets:
        for f in ("masks.safetensors", "finetuned.safetensors"):
            assert (a / "tickets" / t / f).read_bytes() == (b / "tickets" / t / f).read_bytes(), f
        ra, rb = ({k: v for k, v in json.loads((d / "tickets" / t / "result.json").read_text()).items()
                   if k not in timing} for d in (a, b))
        assert ra == rb
    for log in ("metrics.jsonl", "rounds.jsonl", "tickets.jsonl"):
        assert (a / log).read_text() == (b / log).read_text(), log
    # a later call with another ratio adds its ticket; summary.json keeps the earlier ones
    assert main([*args[:-4], "--ratios", "0.3", "--finetune_epochs", "1", "--output_dir", str(tmp_path / "first")]) == 0
    rows = json.loads((a / "summary.json").read_text())["ticket_rows"]
    assert sorted(r["ratio"] for r in rows) == [0.3, 0.5, 0.8]


def _merge_rows(path: str, worker: int, count: int, start) -> None:
    from loft_ext.checkpoint import file_lock, write_json_atomic

    start.wait()  # both merge at the same time (unlocked, this run kept only about half the rows)
    for i in range(count):  # the pipeline's read-merge-write of summary.json's ticket rows
        with file_lock(path + ".lock"):
            with open(path) as f:
                summary = json.load(f)
            summary["ticket_rows"].append(f"{worker}-{i}")
            time.sleep(0.001)  # widen the window a lost update needs
            write_json_atomic(path, summary)


def test_concurrent_summary_merges_lose_no_row(tmp_path):
    """Two pipelines drawing tickets from one pretraining merge their rows into its summary.json at the same
    time: under the lock every row of both survives (without it, one read-modify-write overwrote the other)."""
    import multiprocessing

    path = str(tmp_path / "summary.json")
    with open(path, "w") as f:
        json.dump({"ticket_rows": []}, f)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_merge_rows, args=(path, w, 40, start)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = json.load(open(path))["ticket_rows"]
    assert sorted(rows) == sorted(f"{w}-{i}" for w in range(2) for i in range(40))
