"""The one-command pipeline end to end on the built-in data, for every pretraining method."""
import json
import os
import subprocess
import sys

import pytest
from conftest import check_pretrain_bytes, launcher
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
COMPARE = os.path.join(ROOT, "recipes", "compare_runs.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
TINY = ["--rounds", "6", "--local_steps", "2", "--batch_size", "32", "--bn_recalibration_batches", "1",
        "--earlybird_every", "1", "--finetune_epochs", "1", "--finetune_batch_size", "128"]

pytestmark = pytest.mark.slow


def _run(cmd, tmp_path, extra=()):
    return subprocess.run(cmd + [*TINY, *extra, "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=900)


@pytest.mark.parametrize("method,ticket,score", [("loft", "structured", "l2"), ("dense", "structured", "l2"),
                                                 ("earlybird", "structured", "bn"),
                                                 ("random", "unstructured", "random")])
def test_pipeline_writes_tickets_and_summary_rows(tmp_path, method, ticket, score):
    proc = _run([sys.executable, RECIPE], tmp_path, ["--method", method, "--ticket", ticket, "--ratios", "0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    (row,) = summary["ticket_rows"]
    assert (row["method"], row["ticket"], row["score"], row["ratio"]) == (method, ticket, score, 0.5)
    assert row["S"] == (1 if method in ("dense", "earlybird") else 2)
    assert 0 < row["kept_params"] < row["params"] and 0 <= row["test_acc"] <= 1
    if method == "earlybird":  # dense pretraining ended by the detector (5 checks at the earliest)
        assert row["detector"] and "earlybird" in row["detector"] and row["rounds"] <= 6
    tdir = run_dir / os.path.relpath(row["dir"], str(run_dir))
    for name in ("masks.safetensors", "masks.json", "finetuned.safetensors", "result.json"):
        assert (tdir / name).is_file(), name
    masks = load_file(str(tdir / "masks.safetensors"))
    weights = load_file(str(tdir / "finetuned.safetensors"))
    assert all((weights[n][~m] == 0).all() for n, m in masks.items() if n.endswith("weight"))
    if ticket == "structured":
        assert (tdir / "compact" / "compact.json").is_file()
        assert row["kept_flops"] < row["flops"]
    # the table printed at the end, and again by compare_runs
    assert "test acc" in proc.stdout.splitlines()[-2]
    table = subprocess.run([sys.executable, COMPARE, str(run_dir)], capture_output=True, text=True, cwd=ROOT)
    assert table.returncode == 0 and method in table.stdout.splitlines()[1]
    # resumable: a second call skips every finished stage
    again = _run([sys.executable, RECIPE], tmp_path, ["--method", method, "--ticket", ticket, "--ratios", "0.5"])
    assert again.returncode == 0 and "already finished" in again.stdout and "already fine-tuned" in again.stdout


def test_pipeline_on_two_processes_keeps_pruned_weights_zero(tmp_path):
    proc = _run(launcher("torchrun", 2) + [RECIPE], tmp_path, ["--ratios", "0.5", "--ticket", "unstructured"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (row,) = json.loads((run_dir / "summary.json").read_text())["ticket_rows"]
    assert row["S"] == 2 and row["pretrain_bytes"] > 0 and row["total_bytes"] > row["pretrain_bytes"]
    # LoFT S=2 D=1: pre MiB is every phase that moved bytes, as comm-rank0.json counted them
    phases = check_pretrain_bytes(run_dir, row, proc.stdout)
    assert {"sync", "metric"} <= set(phases) and "dp_grad" not in phases  # allgather: nothing to assemble
    assert (row["samples_per_worker"], row["samples_total"]) == (6 * 2 * 32, 2 * 6 * 2 * 32)
    tdir = run_dir / os.path.relpath(row["dir"], str(run_dir))
    masks, weights = load_file(str(tdir / "masks.safetensors")), load_file(str(tdir / "finetuned.safetensors"))
    assert all((weights[n][~m] == 0).all() for n, m in masks.items())


def test_compare_runs_refuses_unfinished_dirs(tmp_path):
    proc = subprocess.run([sys.executable, COMPARE, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no ticket rows" in proc.stderr
