"""Plugins on real runs: distance products, W&B offline files, state save/load, ranks agreeing."""
import copy
import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from loft_ext.data import BatchStream, load_digits_dataset
from loft_ext.engine.helper import LoFT, LoFTConfig
from loft_ext.engine.loop import fit
from loft_ext.plugins.distance import DistanceStop, FilterDistance
from loft_ext.plugins.earlybird import EarlyBird
from conftest import launcher
from loft_ext.ticket_runs import TICKET_CONFIG_KEYS, TICKET_SUMMARY_KEYS
from wandb_offline import history_keys, runs_by_job_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
SMALL = ["--rounds", "6", "--local_steps", "2", "--batch_size", "32", "--bn_recalibration_batches", "1",
         "--distance_every", "2", "--earlybird_every", "1", "--ratios", ""]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loft", "dense"])
def test_run_writes_distance_products_and_a_wandb_offline_run(tmp_path, method):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    # loft also draws two tickets, for the per-ticket W&B runs (checked below)
    tickets = ["--ratios", "0.5,0.8", "--finetune_epochs", "1", "--finetune_batch_size", "256"] if method == "loft" else []
    proc = subprocess.run([sys.executable, RECIPE, *SMALL, *tickets, "--method", method, "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({method})" in proc.stdout
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for png in ("heatmaps.png", "distance_to_last.png", "distance_consecutive.png"):
        assert (run_dir / "distance" / png).stat().st_size > 1000
    d = json.loads((run_dir / "distance" / "distances.json").read_text())
    assert d["rounds"] == [2, 4, 6]
    layer = next(iter(d["pairwise"]))
    matrix = d["pairwise"][layer]
    assert len(matrix) == 3 and all(row[i] == 0.0 for i, row in enumerate(matrix))
    assert d["to_last"]["aggregate"][-1] == 0.0
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "worker_loss" in r]  # plugins add their own lines (distances, ...)
    assert [r["step"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert any("distance/consecutive" in r for r in lines) and any("earlybird/max_mask_distance" in r for r in lines)
    workers = 2 if method == "loft" else 1
    assert all(len(r["worker_loss"]) == workers for r in rounds)
    # the W&B offline pretraining run: history keys, the table and the images
    runs = runs_by_job_type(run_dir / "wandb")
    (pretrain,) = runs["pretrain"]
    keys, rows = history_keys(pretrain["path"])
    expected = {"lr", "bytes_sent", "epoch/test_acc", "distance/consecutive", "earlybird/max_mask_distance",
                "distance/layers/_type", "distance/heatmaps/_type", "distance/to_last/_type"}
    expected |= {f"worker_loss/{w}" for w in range(workers)}
    assert expected <= keys, expected - keys
    media = glob.glob(os.path.join(os.path.dirname(pretrain["path"]), "files", "media", "**", "*"), recursive=True)
    assert any(m.endswith(".table.json") for m in media)
    assert sum(m.endswith(".png") for m in media) == 3
    # the pretrained model as an artifact, named by the run directory, with the file's hash
    (model,) = [a for a in pretrain["artifacts"] if a["type"] == "model"]
    sha = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    assert model["name"] == f"model-{run_dir.name}" and model["metadata"]["sha256"] == sha
    assert model["files"] == ["model.safetensors"]
    if method == "loft":
        _check_ticket_runs(run_dir, runs, pretrain, model["name"], sha)
    else:
        assert set(runs) == {"pretrain"}


def _check_ticket_runs(run_dir, runs, pretrain, model_name, model_sha):
    """One W&B run per ticket, the same config and summary keys for each, the values of summary.json,
    and the lineage model -> ticket -> fine-tuning as artifacts and their metadata (offline)."""
    rows = {r["ratio"]: r for r in json.loads((run_dir / "summary.json").read_text())["ticket_rows"]}
    tickets = {t["config"]["ratio"]: t for t in runs["ticket"]}
    assert sorted(tickets) == sorted(rows) == [0.5, 0.8]
    for ratio, t in tickets.items():
        summary = {k: v for k, v in t["summary"].items() if not k.startswith("_")}
        assert set(t["config"]) == set(TICKET_CONFIG_KEYS) and set(summary) == set(TICKET_SUMMARY_KEYS)
        assert t["group"] == pretrain["group"] == "resnet18-digits"
        row = rows[ratio]
        assert {k: t["config"][k] for k in ("method", "dataset", "S", "ticket", "score", "pretrain_run",
                                            "optimizer_state", "oneshot_bn_batches")} == \
            {"method": "loft", "dataset": "digits", "S": 2, "ticket": "structured", "score": "l2",
             "pretrain_run": run_dir.name, "optimizer_state": "carry", "oneshot_bn_batches": None}
        for key in ("kept_params", "params", "kept_flops", "test_acc", "total_bytes", "samples_per_worker",
                    "detector_round", "detector_epoch"):
            assert summary[key] == row[key], key
        assert summary["oneshot_test_acc"] is None  # fine-tuned: its one-shot accuracy was not measured
        assert 0 < summary["kept_params"] < summary["params"]
        (art,) = t["artifacts"]
        assert art["type"] == "ticket" and art["name"] == f"ticket-{run_dir.name}-{os.path.basename(row['dir'])}"
        assert art["metadata"]["pretrained_model"] == {"artifact": model_name, "file": "model.safetensors",
                                                       "sha256": model_sha}
        assert {"masks.safetensors", "masks.json", "compact/compact.safetensors"} <= set(art["files"])
    (finetune,) = runs["finetune"]
    assert finetune["summary"]["ticket_artifacts"] == sorted(t["artifacts"][0]["name"] for t in tickets.values())


def _loop(base, data, rounds, plugins, streams=None):
    loft = LoFT(None, copy.deepcopy(base), LoFTConfig(workers=2, local_steps=2), plugins=plugins,
                input_shape=(1, 1, 32, 32), rounds=rounds, rounds_per_epoch=3)
    loft.attach(*[torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in loft.models], begin=False)
    loft.streams = streams or [BatchStream(data.train, 32, s, 2, seed=0) for s in range(2)]
    loft.test_loader = torch.utils.data.DataLoader(data.test, batch_size=360)
    return loft


def _fit(loft):
    return fit(loft, loft.streams, loft.test_loader, lr_fn=lambda r: 0.05)


def _plugins():
    recorder = FilterDistance("split", every=1)
    return [recorder, DistanceStop(recorder, window=3, eps=0.5), EarlyBird(0.5, every=1, keep=3, threshold=0.3)]


def test_plugin_state_survives_save_and_load(model_cache):
    base = model_cache("resnet18", num_classes=10, in_chans=1)
    data = load_digits_dataset(32)
    whole = _loop(base, data, 6, _plugins())
    _fit(whole)

    first = _loop(base, data, 3, _plugins())
    _fit(first)
    saved = json.loads(json.dumps(first.progress_state()))  # through JSON, as a checkpoint stores it
    second = _loop(base, data, 6, _plugins(), streams=first.streams)
    second.engine.full.load_state_dict(first.engine.full.state_dict())
    second.engine.strategy.load_state_dict(first.engine.strategy.state_dict())  # the carried momentum
    second.load_progress_state(saved)
    _fit(second)
    assert [p.state_dict() for p in second.plugins] == [p.state_dict() for p in whole.plugins]
    assert second.state.tickets == whole.state.tickets and whole.state.tickets
    assert second.state.history == whole.state.history


@pytest.mark.slow
def test_detectors_fire_in_the_same_round_on_every_rank_and_stop(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = ["--rounds", "30", "--local_steps", "2", "--batch_size", "32", "--bn_recalibration_batches", "1",
            "--distance_every", "1", "--earlybird_every", "1", "--distance_stop", "--earlybird_stop",
            "--debug_hashes", "--ratios", "", "--output_dir", str(tmp_path)]
    proc = subprocess.run([*launcher("torchrun", 2), RECIPE, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]

    def tickets(rank):
        lines = [json.loads(x) for x in (run_dir / f"hashes-rank{rank}.jsonl").read_text().splitlines()]
        return [(x["ticket"], x["round"]) for x in lines if "ticket" in x]

    assert tickets(0) == tickets(1) and len(tickets(0)) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    stop_round = min(r for _, r in tickets(0))
    assert summary["stopped_early"] and summary["round"] == stop_round < 30
