"""DeepSpeed: the mpu against the installed DeepSpeed's calls, ds_config checks, and real launches."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import free_port, launcher, shm_left_behind
from loft_ext.parallel.ds import DeepSpeedConfigError, LoftMPU, load_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
FAST = ["--rounds", "3", "--local_steps", "2", "--bn_recalibration_batches", "1", "--preset", "all",
        "--debug_hashes", "--ratios", "", "--tracker", "none"]

# files on the path of deepspeed.initialize for ZeRO 0-2 (pipeline and Ulysses engines are not used)
ENGINE_FILES = ["runtime/engine.py", "runtime/config.py", "runtime/utils.py", "runtime/base_optimizer.py",
                "runtime/zero/stage_1_and_2.py", "runtime/bf16_optimizer.py", "runtime/fp16/fused_optimizer.py",
                "runtime/fp16/unfused_optimizer.py", "utils/bwc.py", "utils/groups.py"]


def test_mpu_has_every_method_the_installed_deepspeed_calls():
    import deepspeed

    root = os.path.dirname(deepspeed.__file__)
    called, optional = set(), set()
    for rel in ENGINE_FILES:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            continue
        text = open(path).read()
        called |= set(re.findall(r"mpu\.(get_[a-z_]+)\(", text))
        optional |= set(re.findall(r"hasattr\(\s*(?:self\.)?mpu,\s*['\"](get_[a-z_]+)['\"]", text))
    assert {"get_data_parallel_group_ranks", "get_tensor_model_parallel_src_rank"} <= called  # the scan works
    missing = sorted(n for n in called - optional if not hasattr(LoftMPU, n))
    assert not missing, f"DeepSpeed calls mpu methods LoftMPU lacks: {missing}"
    # the names DeepSpeed prefers when present must be ours, so it never falls back to other groups
    assert {"get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
            "get_tensor_model_parallel_group", "get_pipeline_model_parallel_world_size"} <= set(dir(LoftMPU))
    assert not hasattr(LoftMPU, "initialize_sequence_parallel")


def _cfg(tmp_path, **kw):
    cfg = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}}
    cfg.update(kw)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("change,message", [
    ({"train_batch_size": 100}, "does not match train_micro_batch_size_per_gpu x gradient_accumulation_steps x D"),
    ({"train_batch_size": "auto"}, "train_batch_size must be explicit"),
    ({"fp16": {"enabled": True}}, "fp16.enabled casts the worker's weights to fp16"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, "bf16.enabled casts the worker's weights to bf16"),
    ({"gradient_accumulation_steps": 2, "train_batch_size": 128}, "gradient_accumulation_steps=2"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 4}}, "stage 4"),
])
def test_ds_config_refusals(tmp_path, change, message):
    with pytest.raises(DeepSpeedConfigError, match=re.escape(message)):
        load_ds_config(_cfg(tmp_path, **change), 64, 1)


def test_ds_config_missing_bad_json_and_clipping(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"), 64, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_ds_config(str(bad), 64, 1)
    path = tmp_path / "noclip.json"
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 64}))
    with pytest.raises(DeepSpeedConfigError, match="set gradient_clipping explicitly"):
        load_ds_config(str(path), 64, 1)
    for shipped in os.listdir(os.path.join(ROOT, "ds_configs")):  # every shipped config is explicit
        cfg = json.load(open(os.path.join(ROOT, "ds_configs", shipped)))
        d = 2 if "s2d2" in shipped else 1
        load_ds_config(os.path.join(ROOT, "ds_configs", shipped), cfg["train_micro_batch_size_per_gpu"], d)


def _launch(cmd, out, extra=()):
    proc = subprocess.run(cmd + [RECIPE, *FAST, *extra, "--output_dir", str(out)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert shm_left_behind(cmd) == []
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return proc, run_dir


def _lines(run_dir, rank, key):
    lines = [json.loads(x) for x in (run_dir / f"hashes-rank{rank}.jsonl").read_text().splitlines()]
    return [x for x in lines if key in x]


# the 2-process runs (plain, ZeRO-1, accelerate + DeepSpeed) reset the momentum each round (the paper); the
# 4-process ZeRO-2 / ZeRO-3 test and tests/test_reliability.py's ZeRO-3 resume carry it (the default)
RESET = ["--optimizer_state", "reset"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    _, run_dir = _launch(launcher("torchrun", 2), tmp_path_factory.mktemp("plain"), RESET)
    return [x["assembled"] for x in _lines(run_dir, 0, "assembled")]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1_fp32_cpu.json"])
def test_deepspeed_loft_equals_plain_torch_loft(tmp_path, plain, config):
    # (ZeRO-0, the path without a master copy, runs in-process in tests/test_gpu_check.py's ds_zero0 section;
    # ZeRO-3 with 2 processes equals plain LoFT in tests/test_reliability.py's kill -9 and resume test)
    # ZeRO-1 also runs the whole pipeline: one ticket, fine-tuned (under DDP) in the deepspeed launch
    ticket = ["--ratios", "0.5", "--finetune_epochs", "1"] if config.startswith("zero1") else []
    proc, run_dir = _launch(launcher("deepspeed", 2), tmp_path,
                            ["--deepspeed", "--deepspeed_config", os.path.join(ROOT, "ds_configs", config), *ticket, *RESET])
    assert "2 processes = S=2 x D=1 (allgather, gloo, DeepSpeed)" in proc.stdout
    for rank in (0, 1):
        assert [x["assembled"] for x in _lines(run_dir, rank, "assembled")] == plain  # bit for bit
        checks = _lines(run_dir, rank, "master_matches")
        assert len(checks) == 3 and all(c["master_matches"] for c in checks)
        assert all(c["master_copy"] for c in checks)  # ZeRO 1-3 keep an fp32 master copy
    if ticket:
        (row,) = json.loads((run_dir / "summary.json").read_text())["ticket_rows"]
        assert row["ratio"] == 0.5 and row["kept_params"] < row["params"] and 0 < row["test_acc"] <= 1
        assert len(list((run_dir / "tickets").glob("*/finetuned.safetensors"))) == 1


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_four_processes_two_workers_two_replicas_equal_ddp_replicas(tmp_path):
    """ZeRO-2 (gradients and optimizer state partitioned over a worker's D = 2 replicas) and ZeRO-3 (the
    parameters too: the engine wraps a copy of the sub-network, ds.ZeroThreeReplica) assemble the models that
    plain torch DDP replicas assemble, bit for bit (D = 2: a sum of two gradients, halved exactly), with the
    momentum carried across rounds (``--optimizer_state carry``: ZeRO's flat partitions of it gathered
    before each sync and set back after each load, ds.ZeroCarriedState). ``reset`` runs in the ZeRO-1 test."""
    carry = ["--optimizer_state", "carry"]
    _, ddp_dir = _launch(launcher("torchrun", 4), tmp_path / "ddp", ["--workers", "2", "--batch_size", "64", *carry])
    ddp = [x["assembled"] for x in _lines(ddp_dir, 0, "assembled")]
    assert len(ddp) == 3
    proc, zero3_dir = _launch(launcher("deepspeed", 4), tmp_path / "zero3",
                              ["--deepspeed", "--deepspeed_config",
                               os.path.join(ROOT, "ds_configs", "zero3_fp32_cpu_s2d2.json"), "--workers", "2", *carry])
    assert "4 processes = S=2 x D=2" in proc.stdout
    assert all([x["assembled"] for x in _lines(zero3_dir, r, "assembled")] == ddp for r in range(4))
    for r in range(4):  # at every round start the partitioned copy's fp32 master (gathered) equals the slices
        checks = _lines(zero3_dir, r, "master_matches")
        assert len(checks) == 3 and all(c["master_matches"] and c["master_copy"] for c in checks)
    proc, run_dir = _launch(launcher("deepspeed", 4), tmp_path / "zero2",
                            ["--deepspeed", "--deepspeed_config",
                             os.path.join(ROOT, "ds_configs", "zero2_fp32_cpu_s2d2.json"), "--workers", "2", *carry])
    assert "4 processes = S=2 x D=2" in proc.stdout

    def steps(rank):
        return [x["subnet"] for x in _lines(run_dir, rank, "subnet")]

    assert steps(0) == steps(2) and steps(1) == steps(3) and len(steps(0)) == 6
    assert all(a != b for a, b in zip(steps(0), steps(1)))
    assembled = [[x["assembled"] for x in _lines(run_dir, r, "assembled")] for r in range(4)]
    assert all(a == ddp for a in assembled)


@pytest.mark.slow
def test_accelerate_launch_use_deepspeed_passes_the_loft_mpu(tmp_path, plain):
    """`accelerate launch --use_deepspeed --deepspeed_config_file F`: Accelerate starts the processes,
    loft_ext builds each worker's engine with the LoFT mpu from F; the same models as plain LoFT."""
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", str(free_port()), "--deepspeed_config_file", os.path.join(ROOT, "ds_configs", "zero1_fp32_cpu.json"),
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(cmd + [RECIPE, *FAST, *RESET, "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          env={**ENV, "ACCELERATE_USE_CPU": "1"}, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes = S=2 x D=1 (allgather, gloo, DeepSpeed)" in proc.stdout
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for rank in (0, 1):
        assert [x["assembled"] for x in _lines(run_dir, rank, "assembled")] == plain
        checks = _lines(run_dir, rank, "master_matches")
        assert len(checks) == 3 and all(c["master_matches"] and c["master_copy"] for c in checks)
