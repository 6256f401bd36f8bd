"""benchmarks/gpu_check.py on the CPU (--cpu-smoke): every section that can run here runs and passes, the
CUDA-only parts are recorded as skipped with their reason, and a section that kills its process is recorded
while the next ones still run. (The GPU run itself is for a device session: docs/results.md.)"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DS_BUILD_OPS": "0"}
SECTIONS = {"env", "identity", "s1_equals_sgd", "bf16_rounds", "fsdp_bf16", "ds_zero0_fp32_cpu", "ds_zero1_fp32_cpu",
            "ds_zero1_bf16_gpu", "ds_zero3_fp32_cpu", "ds_zero3_bf16_gpu", "throughput_resnet18", "throughput_resnet50"}


def _run(out, *flags):
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--out", str(out), *flags], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    results = json.loads((out / "results.json").read_text())
    return proc, results


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_records_the_skips(tmp_path):
    proc, res = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    secs = res["sections"]
    assert res["mode"] == "cpu-smoke" and set(secs) == SECTIONS
    assert res["summary"]["failed"] == [] and res["summary"]["error"] == []

    # the correctness checks ran and passed
    for name in ("identity", "s1_equals_sgd", "bf16_rounds", "fsdp_bf16", "ds_zero0_fp32_cpu", "ds_zero1_fp32_cpu",
                 "ds_zero3_fp32_cpu"):
        assert secs[name]["status"] == "ok" and secs[name]["data"]["passed"] is True, (name, secs[name])
    identity = secs["identity"]["data"]["rows"]
    assert [r["workers"] for r in identity] == [2, 4]
    assert all(r["identity_exact"] and r["blank_restore_exact"] and r["split_tensors"] > 0 for r in identity)
    s1 = secs["s1_equals_sgd"]["data"]["rows"]
    assert {(r["mode"], r["optimizer_state"]) for r in s1} == {
        (m, s) for m in ("default", "deterministic") for s in ("reset", "carry")}
    assert all(r["bit_equal"] for r in s1)  # on the CPU S=1 LoFT is plain SGD bit for bit (tests/test_engine.py)
    assert all(r["rel_norm_diff"] == 0 and r["sgd_rerun_max_abs_diff"] == 0 and r["passed"] for r in s1)
    bf16 = secs["bf16_rounds"]["data"]
    assert bf16["finite"] and bf16["worker_loss_last_round"] < bf16["worker_loss_first_round"]
    assert bf16["channels_last_kept"]  # sub-networks keep the channels_last layout of the full model
    fsdp = secs["fsdp_bf16"]["data"]  # the FSDP bf16 policy: bf16 compute, fp32 shards, slices reach the shards
    assert fsdp["forward_output_dtype"] == "torch.bfloat16" and fsdp["shard_dtypes"] == ["torch.float32"]
    assert fsdp["slices_loaded_exactly"] and fsdp["worker_loss_last_round"] < fsdp["worker_loss_first_round"]
    zero0, zero1, zero3 = (secs[f"ds_zero{k}_fp32_cpu"]["data"] for k in (0, 1, 3))
    assert zero0["master_copy"] is False and zero1["master_copy"] is True and zero1["zero_stage"] == 1
    assert zero3["master_copy"] is True and zero3["zero_stage"] == 3  # the engine partitions a copy, pushed per load
    for rounds in (zero0["rounds"], zero1["rounds"], zero3["rounds"]):
        assert len(rounds) >= 2
        assert all(r["module_equals_slices"] and r["master_equals_slices"] for r in rounds)
        assert all(r["next_step_rel_diff"] == 0.0 and r["reference_moved"] for r in rounds)
    # the control: without ds.push_values ZeRO-1's master copy would still hold the old values
    assert all(r["master_stale_before_push"] for r in zero1["rounds"] + zero3["rounds"])

    # the CUDA-only parts are skipped with the reason recorded
    for gpu_only in ("ds_zero1_bf16_gpu", "ds_zero3_bf16_gpu"):
        assert secs[gpu_only]["status"] == "skipped" and "GPU" in secs[gpu_only]["reason"]
    assert secs["env"]["data"]["cuda_available"] is False and "cpu-smoke" in secs["env"]["data"]["reason"]
    for model in ("resnet18", "resnet50"):
        tp = secs[f"throughput_{model}"]
        assert tp["status"] == "ok", tp
        rows = {r["variant"]: r for r in tp["data"]["rows"]}
        assert set(rows) == {"dense", "S=2", "S=4"}
        assert rows["dense"]["params"] > rows["S=2"]["params"] > rows["S=4"]["params"]
        assert all(r["images_per_s"] > 0 and r["peak_mib"] is None for r in rows.values())
        assert any("peak memory not measured" in n for n in tp["data"]["notes"])

    md = (tmp_path / "results.md").read_text()
    assert "| identity | ok |" in md and "| ds_zero1_bf16_gpu | skipped |" in md and "| resnet50 | " in md
    assert (tmp_path / "children.log").exists()
    assert "| s1_equals_sgd | ok |" in proc.stdout  # the table is printed too


@pytest.mark.slow
def test_a_section_that_kills_its_process_is_recorded_and_the_next_ones_run(tmp_path):
    proc, res = _run(tmp_path, "--only", "env,bf16_rounds", "--simulate", "env:crash")
    assert proc.returncode == 1  # outputs written, failure reported
    secs = res["sections"]
    assert secs["env"]["status"] == "crashed" and "code 3" in secs["env"]["reason"]
    assert secs["bf16_rounds"]["status"] == "ok"
    assert [launch["items"] for launch in res["launches"]] == [["env", "bf16_rounds"], ["bf16_rounds"]]
    assert res["summary"]["error"] == ["env"]
