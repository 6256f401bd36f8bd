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
METHODS = ("loft-S2", "loft-S4", "dense", "earlybird", "random", "random-dense")


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
    # every run carries the momentum (LoFT's default; dense always does): LoFT's sync counts it like the
    # weights, about twice reset's
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from study import SMOKE, sync_bytes_per_round
    for r in study["runs"]:
        assert r["optimizer_state"] == "carry", r
        if r["method"] == "loft":
            data = next(d for d in SMOKE.datasets if d.name == r["dataset"])
            reset = sync_bytes_per_round(SMOKE, data, r["S"], "reset") * r["rounds"]
            assert 1.8 < r["sync_bytes_per_rank"] / reset <= 2.0
    table = (results / "study.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and "## Goals" in table
    # pretrainings checkpoint every epoch (a kill -9 loses one epoch at most) and keep none once finished
    finished = [d for d in (tmp_path / "runs").iterdir() if (d / "summary.json").is_file()]
    assert len(finished) == 7 and not any((d / "checkpoints").exists() for d in finished)

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


@pytest.mark.slow
def test_sigterm_to_the_study_stops_its_workers_too(tmp_path):
    """`kill <study>` (SIGTERM to the driver alone, as a scheduler or `timeout` sends it) must not leave its
    spawned pipeline workers running: they would keep training into the same run directories."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, STUDY, "--smoke", "--jobs", "2", "--output_dir", str(tmp_path / "runs"),
                             "--results_dir", str(tmp_path / "results")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)

    def children():
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/metrics.jsonl")):
        time.sleep(0.5)  # a pipeline is training
    workers = children()
    assert len(workers) >= 2, workers  # the two pipeline workers (and the resource tracker)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: run the same command again" in err
    time.sleep(1)
    alive = [p for p in workers if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not alive, alive


def test_earliest_firing_follows_the_windows():
    sys.path.insert(0, os.path.dirname(STUDY))
    import study

    data = study.FULL.datasets[0]   # records every 2 rounds
    # a 1-epoch window over 32 rounds per epoch: the first record (round 2) plus 32 rounds -> round 34;
    # Early-Bird at epoch ends: 5 masks -> epoch 5
    ungated = study.dataclasses.replace(study.FULL, distance_lr_below=1.0)
    assert study.earliest_firing(ungated, data, 32) == (34 / 32, 5.0)
    # checked only once the lr fell to half its peak: the step schedule's first drop is at round 160 (of
    # 320), whose record is the first seen at 0.01
    assert study.earliest_firing(study.FULL, data, 32) == (162 / 32, 5.0)
    # a cosine schedule falls to half its peak at the same round (half of the rounds)
    cosine = study.dataclasses.replace(study.FULL, lr_schedule="cosine")
    assert study.earliest_firing(cosine, data, 32) == (162 / 32, 5.0)
    # at 0.1x: 0.5 (1 + cos(pi i / 320)) <= 0.1 from round index 255 (254.45), so the record of round 256
    assert study.earliest_firing(study.dataclasses.replace(cosine, distance_lr_below=0.1), data, 32)[0] == 256 / 32
    # a window of 5 records: round 10; Early-Bird on the same grid: 5 checks of 2 rounds
    legacy = study.dataclasses.replace(study.FULL, distance_window_epochs=0.0, earlybird_every=-1,
                                       distance_lr_below=1.0)
    assert study.earliest_firing(legacy, data, 32) == (10 / 32, 10 / 32)


def test_plan_lists_the_full_study_without_running_it(tmp_path):
    proc = subprocess.run([sys.executable, STUDY, "--plan", "--output_dir", str(tmp_path)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    # 1 data set x 5 seeds x (fixed: loft-S4, loft-S2, dense; stop: the same and earlybird)
    assert len(lines) == 1 * 5 * 7
    assert sum("loft-S2,random" in line for line in lines) == 5 * 2
    assert sum("dense,random-dense" in line for line in lines) == 5 * 2
    quick = subprocess.run([sys.executable, STUDY, "--plan", "--quick", "--output_dir", str(tmp_path)],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    # the quick study is the full one's first seed: the same run directories
    assert quick.returncode == 0 and quick.stdout.strip().splitlines() == [l for l in lines if "/seed0 " in l]
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


def test_goals_cover_every_ratio_of_the_spec_and_are_plain_json(tmp_path):
    """The goals are judged per ratio of the study's spec (not fixed ratios), and what they hold goes into
    study.json (a numpy bool from scipy's interval once broke the write)."""
    import importlib.util

    loader = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(loader)
    sys.modules["study"] = study
    loader.loader.exec_module(study)
    spec = study.FULL
    acc = {"dense": [0.87, 0.88, 0.875], "random-dense": [0.85, 0.86, 0.852], "loft-S2": [0.866, 0.878, 0.87],
           "random": [0.84, 0.85, 0.845]}
    cells = [{"dataset": "fashion_mnist", "budget": "fixed", "method": m, "ratio": r, "seeds": [0, 1, 2],
              "test_acc": v} for m, v in acc.items() for r in spec.ratios]
    goals = study.goals(spec, [], cells)
    parity = [g for g in goals if g["goal"].startswith("LoFT ticket within")]
    control = [g for g in goals if g["method"] == "random-dense"]
    assert sorted(g["ratio"] for g in parity) == sorted(spec.ratios) == sorted(g["ratio"] for g in control)
    assert all(g["met"] for g in control) and not any(g["met"] for g in parity)  # -2.1 and -0.37 +- 0.4 points
    json.dumps(goals)  # plain Python numbers and bools only


# ------------------------------------------------------------------ benchmarks/pretrain_quality.py
def _pretrain_quality():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import pretrain_quality
    return pretrain_quality


def test_pretrain_quality_pairs_seeds_and_gives_a_t_interval():
    pq = _pretrain_quality()
    loft = {0: 0.850, 1: 0.860, 2: 0.870, 7: 0.5}  # seed 7 has no dense partner: left out
    dense = {0: 0.880, 1: 0.870, 2: 0.890}
    d = pq.paired(loft, dense)
    diffs = [-3.0, -1.0, -2.0]  # points
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) x std / sqrt(n); std of the diffs is 1
    assert d["n"] == 3 and d["mean"] == pytest.approx(sum(diffs) / 3) and d["std"] == pytest.approx(1.0)
    assert d["ci95"] == pytest.approx([-2.0 - half, -2.0 + half])
    assert pq.paired({0: 0.9}, {0: 0.8})["ci95"] is None and pq.paired({0: 0.9}, {1: 0.8}) is None


@pytest.mark.parametrize("arm, expected", [
    ("dense", {"method": "dense", "lr": None, "epochs": None}),
    ("loft-L8-carry", {"method": "loft", "local_steps": 8, "optimizer_state": "carry", "lr": None}),
    ("loft-L4-reset-lr0.2-e15", {"method": "loft", "local_steps": 4, "lr": 0.2, "epochs": 15}),
    ("dense-e3.6", {"method": "dense", "epochs": 3.6})])
def test_pretrain_quality_arms(arm, expected):
    parsed = _pretrain_quality().parse_arm(arm)
    assert {k: parsed[k] for k in expected} == expected
    assert type(parsed["epochs"]) is type(expected.get("epochs"))   # whole epochs stay int: hashes unchanged


def test_equal_flops_dense_budget_in_whole_epochs_or_exact_rounds():
    pq = _pretrain_quality()
    # all of Fashion-MNIST: 938 batches of 64 -> 235 rounds of L=4 per epoch (the recipe's count)
    args = pq.build_parser().parse_args(["--train_subset", "0", "--epochs", "3"])
    assert pq.rounds_per_epoch(args, 4) == 235
    flops = {"dense": 100.0, "loft_worker_mean": 60.0}   # S=2 -> 1.2x dense's FLOPs: 3.6 dense epochs
    assert pq.dense_flops_epochs(args, flops) == 4
    args.dense_flops = "rounds"
    assert pq.dense_flops_epochs(args, flops) == 846 / 235          # round(3.6 x 235) rounds
    assert pq.epoch_budget(args, 4, 846 / 235) == {"epochs": 4, "rounds": 846}
    assert pq.epoch_budget(args, 4, 3) == {"epochs": 3}             # whole epochs hash as before
    subset = pq.build_parser().parse_args(["--dense_flops", "rounds"])   # 8,000 images, 10 epochs: 32 rounds each
    assert pq.dense_flops_epochs(subset, flops) == 12 and type(pq.dense_flops_epochs(subset, flops)) is int
    train_hp = pq.hparams(args, "dense-flops", 0, 846 / 235)[3]
    assert (train_hp.epochs, train_hp.rounds) == (4, 846)


def test_pretrain_quality_names_one_log_per_run_directory():
    # two presets' launches side by side once wrote seed 7's rounds into one shared "loft-L4-carry-seed7.log"
    pq = _pretrain_quality()
    one_dim, flops = (pq.build_parser().parse_args(["--model", "resnet14t", "--preset", p])
                      for p in ("one_dim", "one_dim_flops"))
    assert pq.run_name(one_dim, "loft-L4-carry", 7, 10) != pq.run_name(flops, "loft-L4-carry", 7, 10)
    assert pq.run_name(one_dim, "loft-L4-carry", 7, 10) != pq.run_name(one_dim, "loft-L4-carry", 8, 10)
    assert pq.run_name(one_dim, "dense", 7, 10) == pq.run_name(flops, "dense", 7, 10)   # dense splits nothing
    assert pq.run_name(one_dim, "dense", 7, 10).startswith("resnet14t-")


def test_pretrain_quality_pairs_an_arm_with_its_runs_under_another_preset(tmp_path):
    pq = _pretrain_quality()
    args = pq.build_parser().parse_args(["--model", "resnet14t", "--preset", "one_dim_flops",
                                         "--output_dir", str(tmp_path), "--against_preset", "one_dim"])
    other = pq.build_parser().parse_args(["--model", "resnet14t", "--preset", "one_dim", "--output_dir", str(tmp_path)])

    def finish(a, arm, seed, acc):   # what run_pretrain leaves in a finished run directory
        d = tmp_path / pq.run_name(a, arm, seed, 10)
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"test_acc": acc, "samples_per_worker": 81920,
                                                    "samples_total": 163840, "wall_s": 1.0}))
    for seed, (mine, theirs) in enumerate([(0.86, 0.85), (0.87, 0.87), (0.85, 0.86)]):
        finish(args, "loft-L4-carry", seed, mine)
        if seed < 2:
            finish(other, "loft-L4-carry", seed, theirs)   # seed 2 not run under one_dim: left out of the pairing
    jobs = [("loft-L4-carry", s, 10) for s in range(3)] + [("dense", 0, 10)]
    assert [r["seed"] for r in pq.finished_runs(args, jobs)] == [0, 1, 2]
    against = pq.against_preset_accuracies(args, jobs)
    assert against == {"loft-L4-carry": {0: 0.85, 1: 0.87}}
    flops = {"dense": 3.0, "loft_worker_mean": 2.0, "sync_bytes_per_round": {"reset": 1.0, "carry": 2.0}}
    row = pq.report(args, pq.finished_runs(args, jobs), flops, against)["rows"][0]
    assert row["vs_against_preset"]["n"] == 2 and row["vs_against_preset"]["mean"] == pytest.approx(0.5)
    assert row["against_preset_acc"]["mean"] == pytest.approx(86.0)
    with pytest.raises(SystemExit, match="is the --preset itself"):
        pq.main(["--preset", "one_dim", "--against_preset", "one_dim"])


@pytest.mark.parametrize("arm", ["loft-L4", "loft-Lx-carry", "loft-L4-keep", "dense-lrx", "loft-L4-carry-e0"])
def test_pretrain_quality_refuses_unknown_arms(arm):
    with pytest.raises(SystemExit, match="is not dense, dense-flops or loft-L<k>-<reset|carry>"):
        _pretrain_quality().parse_arm(arm)


# ------------------------------------------------------------------ benchmarks/ticket_regimes.py
def _ticket_regimes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ticket_regimes
    return ticket_regimes


def _args(tr, **changes):
    return tr.argparse.Namespace(**{**vars(tr.build_parser().parse_args([])), **changes})


def test_ticket_regimes_rewind_to_the_same_epoch_at_every_local_step_count():
    tr = _ticket_regimes()
    # 8,000 images / batch 64 = 125 batches per epoch: one epoch ends in round 32 at L=4 (rounded up), 16 at L=8
    assert tr.rewind_round(_args(tr), "loft-L4-reset") == 32 == tr.rewind_round(_args(tr), "dense")
    assert tr.rewind_round(_args(tr), "loft-L8-carry") == 16
    assert tr.rewind_round(_args(tr, rewind_epoch=0.5), "loft-L8-carry") == 8
    hp = tr.ticket_hparams(_args(tr), "unstructured-rewind-e5", "loft-L8-carry", random=True)
    assert (hp.rewind, hp.rewind_round, hp.prune_score, hp.ratios) == ("round", 16, "random", (0.9, 0.98))


def test_ticket_regimes_judge_the_control_and_parity_on_paired_intervals():
    tr = _ticket_regimes()
    acc = {"dense": [0.90, 0.91, 0.92], "random:dense": [0.88, 0.885, 0.90],   # -2, -2.5, -2 points
           "loft-L4-reset": [0.899, 0.912, 0.918], "random:loft-L4-reset": [0.91, 0.91, 0.92]}
    rows = [{"regime": "unstructured-ft2", "ratio": 0.9, "source": s, "seed": i, "test_acc": a}
            for s, v in acc.items() for i, a in enumerate(v)]
    # a second cell where random masks do as well: the regime does not discriminate there
    rows += [{**r, "ratio": 0.5, "regime": "structured-ft1",
              "test_acc": acc["dense"][r["seed"]] if r["source"].startswith("random") else r["test_acc"]} for r in rows]
    result = tr.report(_args(tr), rows, ["dense", "loft-L4-reset"])
    cell, other = result["cells"]
    assert (cell["regime"], cell["ratio"], other["regime"]) == ("unstructured-ft2", 0.9, "structured-ft1")
    control = cell["diffs"]["random:dense - dense"]
    assert control["mean"] == pytest.approx(-13 / 6) and control["ci95"][1] < 0 and cell["discriminates"]
    loft = cell["diffs"]["loft-L4-reset - dense"]  # -0.1, +0.2, -0.2 points: the interval's lower end is -0.6
    assert loft["mean"] == pytest.approx(-0.1 / 3) and loft["ci95"][0] < -0.5
    assert cell["parity"] == {"loft-L4-reset": False}
    assert set(cell["diffs"]) == {"random:dense - dense", "random:loft-L4-reset - dense",
                                  "random:loft-L4-reset - loft-L4-reset", "loft-L4-reset - dense"}
    assert not other["discriminates"] and other["diffs"]["random:dense - dense"]["mean"] == 0


@pytest.mark.parametrize("text, message", [("a", "comma-separated integers"), ("1,x", "comma-separated integers"),
                                           (",", "names no seed")])
def test_bad_seeds_are_one_clear_error(text, message):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import study
    with pytest.raises(SystemExit, match=message):
        study.parse_seeds(text)
    assert study.parse_seeds("0, 2,") == (0, 2)


@pytest.mark.parametrize("flags", [[], ["--model", "resnet14t", "--preset", "one_dim"],
                                   ["--train_subset", "0", "--test_subset", "0", "--epochs", "3"]])
def test_ticket_regimes_find_the_pretrainings_pretrain_quality_made(flags):
    """The sweep reuses pretrain_quality's runs only when both scripts build the same hparams from the same
    flags (a flag added to one script alone once broke the sweep)."""
    tr = _ticket_regimes()
    pq = tr.pretrain_quality
    for arm in ("dense", "loft-L4-carry"):
        ours = tr.pretrain_hparams(tr.build_parser().parse_args(flags), arm, 3, rewinding=False)
        theirs = pq.hparams(pq.build_parser().parse_args(flags), arm, 3, pq.parse_arm(arm)["epochs"] or
                            pq.build_parser().parse_args(flags).epochs)
        assert ours == list(theirs)
    full = tr.build_parser().parse_args(["--train_subset", "0"])
    assert tr.rewind_round(full, "loft-L4-carry") == math.ceil(math.ceil(60000 / 64) / 4)
    assert pq.data_description(full) == "fashion_mnist train 60000 / test 2000 at 28px"


def test_another_study_never_writes_over_the_main_tables():
    sys.path.insert(0, os.path.dirname(STUDY))
    import study

    def variant(windows="epochs", **changes):
        spec = study.dataclasses.replace(study.FULL, **changes)
        if windows == "records":   # what main() does for --detector_windows records
            spec = study.dataclasses.replace(spec, distance_window_epochs=0.0, earlybird_every=-1,
                                             distance_lr_below=changes.get("distance_lr_below", 1.0))
        return study.results_variant(spec, windows)

    assert variant() == ""
    assert variant(distance_lr_below=1.0) == "lr_below1"
    assert variant("records") == "records"
    assert variant("records", distance_lr_below=0.5) == "records-lr_below0.5"   # not over the records study
    assert variant("records", model="resnet14t", preset="all") == "resnet14t-all-records"
    assert variant(lr_schedule="cosine") == "cosine"
    assert variant(model="resnet14t", lr_schedule="cosine") == "resnet14t-cosine"
