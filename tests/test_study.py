"""The ticket-quality study driver (benchmarks/study.py) end to end at its smoke size, and its resumption."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "benchmarks", "study.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
METHODS = ("loft-S2", "loft-S4", "dense", "earlybird", "random")


def _study(tmp_path, *extra):
    return subprocess.run([sys.executable, STUDY, "--smoke", "--output_dir", str(tmp_path / "runs"),
                           "--results_dir", str(tmp_path / "results"), *extra],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_smoke_study_writes_every_method_and_resumes(tmp_path):
    proc = _study(tmp_path, "--jobs", "2")  # two pipelines side by side (spawned processes)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" done in ") == 7
    results = tmp_path / "results"
    for name in ("study.json", "study.md", "study_accuracy_vs_ratio.png", "study_distance_curves.png"):
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name
    for name in ("study_accuracy_vs_ratio.png", "study_distance_curves.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((results / "study.json").read_text())
    assert study["smoke"] and not study["missing_runs"]
    ratios = study["config"]["ratios"]
    for method in METHODS:
        rows = [r for r in study["tickets"] if r["method"] == method]
        assert sorted(r["ratio"] for r in rows if r["budget"] == rows[0]["budget"]) == sorted(ratios), method
        for r in rows:
            assert math.isfinite(r["test_acc"]) and 0 <= r["test_acc"] <= 1, r
            assert 0 < r["kept_params"] < r["params"]
    cells = study["summary"]["cells"]
    assert {c["method"] for c in cells} == set(METHODS)
    assert all(c["n"] == 1 and 0 <= c["test_acc_mean"] <= 1 for c in cells)
    assert any(r["method"] == "loft" and r["S"] == 4 for r in study["runs"])
    assert {r["budget"] for r in study["runs"]} == {"fixed", "stop"}
    table = (results / "study.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and "## Goals" in table

    # resumable: running it again (in this process: --jobs 1) trains nothing, every pipeline stage is
    # skipped, and the outputs are written again
    os.remove(results / "study.json")
    again = _study(tmp_path, "--jobs", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (results / "study.json").is_file()
    logs = tmp_path / "runs" / "logs"
    for log in logs.iterdir():
        last = log.read_text().split("\n== ")[-1]
        assert "already finished" in last and "fine-tune epoch" not in last, log.name


def test_plan_lists_the_full_study_without_running_it(tmp_path):
    proc = subprocess.run([sys.executable, STUDY, "--plan", "--output_dir", str(tmp_path)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    # 2 data sets x 3 seeds x (fixed: loft-S4, loft-S2, dense; stop: the same and earlybird)
    assert len(lines) == 2 * 3 * 7
    assert sum("loft-S2,random" in line for line in lines) == 2 * 3 * 2
    assert not any(tmp_path.iterdir())  # nothing written


def test_wandb_logs_one_group_per_cell_and_leaves_the_run_directories_alone(tmp_path):
    import dataclasses
    import importlib.util

    loader = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(loader)
    sys.modules["study"] = study  # dataclasses look their module up by name
    loader.loader.exec_module(study)
    spec = dataclasses.replace(study.FULL, wandb_project="loft_ext-study")
    tasks = study.make_tasks(spec, [d.name for d in spec.datasets], study.BUDGETS, study.METHODS, spec.seeds)
    groups = {}
    for task in tasks:
        pre, _ = study.hparams_of(spec, task, str(tmp_path), str(tmp_path))
        out = pre[-1]
        assert (out.tracker, out.wandb_project) == ("wandb", "loft_ext-study")
        groups.setdefault(out.wandb_group, set()).add((task.data.name, task.budget))
        plain, _ = study.hparams_of(study.FULL, task, str(tmp_path), str(tmp_path))
        assert plain[-1].tracker == "none"
        assert study.run_dir_of(pre, str(tmp_path)) == study.run_dir_of(plain, str(tmp_path))
    # every cell (data set x budget) is exactly one group, holding all of its methods and seeds
    assert all(len(cells) == 1 for cells in groups.values())
    assert len(groups) == len({(t.data.name, t.budget) for t in tasks})
