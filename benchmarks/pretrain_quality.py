#!/usr/bin/env python
"""LoFT pretraining quality against dense training at explicit budgets (issue 16, item 0).

Does the model LoFT assembles reach the accuracy of dense training, and with which LoFT settings?
Every arm pretrains the same model on the same data with the same learning-rate schedule, in one
process (S simulated workers give the same run as S processes), for several seeds:

| arm | what | budget |
|---|---|---|
| dense | ``--method dense``, batch B, E epochs | every sample E times through the full model |
| loft-L<k>-<state> | ``--method loft``, S workers, L = k, ``--optimizer_state`` reset/carry, batch B, E epochs | every worker sees every sample E times through its narrower sub-network: **equal samples per worker** with dense |
| dense-flops | dense for the epochs that spend the training FLOPs of LoFT at L=4 (either optimizer state): the nearest whole epochs, or with ``--dense_flops rounds`` exactly its rounds | **equal total FLOPs** with that arm |

Any arm may end in ``-lr<x>`` (its base learning rate) and ``-e<x>`` (its epochs instead of ``--epochs``;
a fraction such as ``dense-e3.6`` trains that many epochs' rounds, the schedule over them), e.g.
``loft-L4-carry-e15``.

Training FLOPs are 3x the forward FLOPs per sample (torch's FlopCounterMode on the full model and on
each worker's sub-network) times the samples each network processed. Accuracy is the assembled model's
test accuracy after the recipe's BatchNorm recalibration. Differences to dense are paired by seed:
mean, standard deviation and a 95% t-interval of the per-seed differences; a goal ("within 0.5 point
of dense") is met when the whole interval lies above -0.5 points.

    python benchmarks/pretrain_quality.py --jobs 2                       # the default probe
    python benchmarks/pretrain_quality.py --arms dense,loft-L4-reset --seeds 0,1,2
    python benchmarks/pretrain_quality.py --report_only                  # tables from finished runs
    python benchmarks/pretrain_quality.py --preset one_dim_flops --arms loft-L4-carry --report_only \
        --against_preset one_dim                                         # the same arm under two presets, paired
    python benchmarks/pretrain_quality.py --train_subset 0 --test_subset 0 --epochs 3   # all of Fashion-MNIST

Runs live in ``--output_dir`` (default runs/pretrain_quality) under their hparams hash, so a rerun skips
finished ones and continues an interrupted one from its last epoch-end checkpoint (``--resume latest``);
a finished run keeps no checkpoints (``--finished_run_checkpoints delete``); each run's progress goes to
``<output_dir>/logs/<run directory>.log``. Writes ``--results``
(default docs/results/pretrain_quality.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study import DataSpec, data_dir_of, interval, make_fashion_subset, paired, parse_seeds, pool_results  # noqa: E402

DATA = DataSpec("fashion_mnist", "fashion_mnist", image_size=28, epochs=10, detector_every=0,
                train_subset=8000, test_subset=2000)


def data_of(args) -> DataSpec:
    """The default subset, or the one --train_subset / --test_subset name (0 = the whole split)."""
    return DataSpec(DATA.name, DATA.dataset, DATA.image_size, DATA.epochs, DATA.detector_every,
                    train_subset=args.train_subset, test_subset=args.test_subset)


def add_pretraining_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that make a pretraining's hparams (``hparams``): scripts that reuse these runs
    (ticket_regimes.py) take the same flags, so they find the same run directories."""
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--preset", default="all", help="the LoFT arms' partition preset (all, paper, one_dim, one_dim_flops); dense "
                        "runs split nothing and are shared by every preset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=DATA.epochs, help="pretraining epochs of dense and LoFT")
    parser.add_argument("--train_subset", type=int, default=DATA.train_subset,
                        help="stratified Fashion-MNIST training images (a multiple of 10; 0 = all 60,000)")
    parser.add_argument("--test_subset", type=int, default=DATA.test_subset,
                        help="stratified Fashion-MNIST test images (a multiple of 10; 0 = all 10,000)")
    parser.add_argument("--data_root", default=os.path.join(ROOT, "data"))
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "runs", "pretrain_quality"))


def data_description(args) -> str:
    return (f"fashion_mnist train {args.train_subset or 60000} / test {args.test_subset or 10000} at "
            f"{DATA.image_size}px")


def parse_arm(arm: str) -> dict:
    """``dense``, ``dense-flops`` or ``loft-L<k>-<reset|carry>``, each optionally followed by ``-lr<x>`` (the
    base learning rate of that arm instead of ``--lr``) and ``-e<x>`` (its epochs instead of ``--epochs``; a
    fraction trains that many epochs' rounds)."""
    parts = arm.split("-")
    extra = {"lr": None, "epochs": None}
    while len(parts) > 1 and parts[-1][:2] in ("lr", "e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"):
        key, text = ("lr", parts[-1][2:]) if parts[-1].startswith("lr") else ("epochs", parts[-1][1:])
        try:
            value = float(text)
        except ValueError:
            value = -1
        if key == "epochs" and value > 0 and value.is_integer():
            value = int(value)   # whole epochs hash as before (TrainHparams.epochs)
        if extra[key] is not None or value <= 0:
            break
        extra[key] = value
        parts.pop()
    if parts in (["dense"], ["dense", "flops"]):
        return {"method": "dense", "local_steps": 4, "optimizer_state": "carry", **extra}
    if (len(parts) != 3 or parts[0] != "loft" or not parts[1].startswith("L") or not parts[1][1:].isdigit()
            or parts[2] not in ("reset", "carry")):
        raise SystemExit(f"error: arm {arm!r} is not dense, dense-flops or loft-L<k>-<reset|carry>, each with an "
                         "optional -lr<x> and -e<epochs> (a whole number or a fraction, e.g. -e3.6)")
    return {"method": "loft", "local_steps": int(parts[1][1:]), "optimizer_state": parts[2], **extra}


def batches_per_epoch(args) -> int:
    """Batches per worker and epoch of the training subset (0 = all 60,000 images)."""
    return math.ceil((args.train_subset or 60000) / args.batch_size)


def rounds_per_epoch(args, local_steps: int) -> int:
    """The recipe's rounds per epoch (loft_ext/engine/pretrain.py): batches per worker, L to a round."""
    return max(1, math.ceil(batches_per_epoch(args) / local_steps))


def epoch_budget(args, local_steps: int, epochs: float) -> dict:
    """TrainHparams' budget fields for ``epochs``: whole epochs as ``epochs``; a fraction as the rounds it
    makes (``rounds`` overrides ``epochs``, and the schedule spans them)."""
    if float(epochs).is_integer():
        return {"epochs": int(epochs)}
    return {"epochs": math.ceil(epochs), "rounds": max(1, round(epochs * rounds_per_epoch(args, local_steps)))}


def loft_flops_in_dense_epochs(args, flops: dict) -> float:
    """The training FLOPs of LoFT at L=4 for ``args.epochs``, in dense epochs (not rounded)."""
    return args.epochs * args.workers * flops["loft_worker_mean"] / flops["dense"]


def dense_flops_epochs(args, flops: dict) -> float:
    """The dense epochs that spend the training FLOPs of LoFT at L=4: the nearest whole number
    (``--dense_flops epochs``, at least 1) or exactly, to a round (``rounds``)."""
    exact = loft_flops_in_dense_epochs(args, flops)
    if args.dense_flops == "epochs":
        return max(1, round(exact))
    per_epoch = rounds_per_epoch(args, parse_arm("dense")["local_steps"])
    rounds = max(1, round(exact * per_epoch))
    return rounds // per_epoch if rounds % per_epoch == 0 else rounds / per_epoch


def format_epochs(epochs: float) -> str:
    return f"{epochs}" if float(epochs).is_integer() else f"{epochs:.2f}"


def hparams(args, arm: str, seed: int, epochs: float):
    from loft_ext.engine.config import (DataHparams, DetectorHparams, LoftHparams, ModelHparams, OutputHparams,
                                        TrainHparams)

    a = parse_arm(arm)
    loft = a["method"] == "loft"
    # dense training splits nothing: its runs (hashed with preset all) serve every --preset
    return (ModelHparams(model=args.model, preset=args.preset if loft else "all"),
            DataHparams(dataset=DATA.dataset, data_dir=data_dir_of(data_of(args), args.data_root),
                        image_size=DATA.image_size,
                        batch_size=args.batch_size),
            LoftHparams(workers=args.workers if loft else 2, local_steps=a["local_steps"],
                        method=a["method"], optimizer_state=a["optimizer_state"]),
            TrainHparams(**epoch_budget(args, a["local_steps"], epochs), lr=a["lr"] or args.lr, seed=seed),
            DetectorHparams(distance_layers="none", earlybird=False),
            OutputHparams(output_dir=args.output_dir, tracker="none"))


def run_name(args, arm: str, seed: int, epochs: float) -> str:
    """The run directory's name under ``--output_dir``, as run_pretrain names it (model and hparams hash)."""
    from loft_ext.hparams import hparams_hash

    return f"{args.model}-{hparams_hash(*hparams(args, arm, seed, epochs)[:5])}"


def costs(args) -> dict[str, float]:
    """Training FLOPs per sample (3 x forward) of the full model and of the mean LoFT worker sub-network,
    and the bytes one rank sends per round when the S workers are S processes (``--sync allgather``, fp32;
    the analytic count, which equals the measured one: tests/test_distributed.py), without and with
    carried momentum (one state copy per parameter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from loft_ext.models import create_model
    from loft_ext.parallel.analytic import allgather_round_bytes
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import build_subnet

    def forward(model):
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, DATA.image_size, DATA.image_size))
        return counter.get_total_flops()

    torch.manual_seed(0)
    full = create_model(args.model, 10, 1)
    plan = make_plan(full, args.workers, args.preset, (1, 1, DATA.image_size, DATA.image_size), args.model)
    workers = [forward(build_subnet(full, plan, s)) for s in range(args.workers)]
    return {"dense": 3.0 * forward(full), "loft_worker_mean": 3.0 * sum(workers) / len(workers),
            "sync_bytes_per_round": {state: allgather_round_bytes(full, plan, args.workers, 4, copies)
                                     for state, copies in (("reset", 0), ("carry", 1))}}


def run_one(args, arm: str, seed: int, epochs: int) -> dict:
    import torch

    from loft_ext.engine.config import CheckpointHparams
    from loft_ext.engine.pretrain import run_pretrain

    torch.set_num_threads(1)
    # one log per run directory: runs of other models, presets or budgets never share a file
    log_path = os.path.join(args.output_dir, "logs", f"{run_name(args, arm, seed, epochs)}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        def say(*a, **k):
            log.write(" ".join(str(x) for x in a) + "\n")
            log.flush()
        t0 = time.time()
        # an interrupted run continues from its last epoch-end checkpoint; a finished one keeps none
        summary = run_pretrain(*hparams(args, arm, seed, epochs), print_fn=say,
                               ckpt_hp=CheckpointHparams(resume="latest", finished_run_checkpoints="delete"))
    return {"arm": arm, "seed": seed, "epochs": epochs, "run_dir": os.path.relpath(summary["run_dir"], ROOT),
            "test_acc": summary["test_acc"], "samples_per_worker": summary["samples_per_worker"],
            "samples_total": summary["samples_total"], "sync_bytes_sent": summary.get("sync_bytes_sent", 0.0),
            "wall_s": time.time() - t0, "skipped": summary.get("skipped", False)}


def _same_settings(args, a: dict, accs: dict, by_arm: dict) -> dict | None:
    """A LoFT arm with its own lr or epochs against the dense arm run with the same ones (e.g.
    ``loft-L4-carry-e15`` against ``dense-e15``), when that was run."""
    if a["method"] != "loft" or (a["lr"] is None and a["epochs"] is None):
        return None
    for d in by_arm:
        if d.startswith("dense") and not d.startswith("dense-flops"):
            b = parse_arm(d)
            if (b["lr"] or args.lr, b["epochs"] or args.epochs) == (a["lr"] or args.lr, a["epochs"] or args.epochs):
                return paired(accs, by_arm[d])
    return None


def finished_runs(args, jobs: list[tuple]) -> list[dict]:
    """The runs of ``jobs`` (arm, seed, epochs) that have finished in ``--output_dir``; the others are left out."""
    runs = []
    for arm, seed, epochs in jobs:
        path = os.path.join(args.output_dir, run_name(args, arm, seed, epochs), "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                s = json.load(f)
            runs.append({"arm": arm, "seed": seed, "epochs": epochs, "run_dir": os.path.relpath(os.path.dirname(path), ROOT),
                         "test_acc": s["test_acc"], "samples_per_worker": s["samples_per_worker"],
                         "samples_total": s["samples_total"], "sync_bytes_sent": s.get("sync_bytes_sent", 0.0),
                         "wall_s": s["wall_s"], "skipped": True})
    return runs


def against_preset_accuracies(args, jobs: list[tuple]) -> dict[str, dict[int, float]]:
    """``--against_preset``: the finished runs of the same LoFT arms and seeds under that preset, by arm and seed
    (dense runs split nothing, so they are the same runs under every preset and are not compared)."""
    if not args.against_preset:
        return {}
    other = argparse.Namespace(**{**vars(args), "preset": args.against_preset})
    by_arm: dict[str, dict[int, float]] = {}
    for r in finished_runs(other, [j for j in jobs if parse_arm(j[0])["method"] == "loft"]):
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["test_acc"]
    return by_arm


def _mean_std(accs: dict[int, float]) -> dict:
    values = [100 * v for v in accs.values()]
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def report(args, runs: list[dict], flops: dict, against: dict[str, dict[int, float]] | None = None) -> dict:
    by_arm: dict[str, dict[int, float]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["test_acc"]
    rows = []
    for arm, accs in by_arm.items():
        mine = [r for r in runs if r["arm"] == arm]
        a = parse_arm(arm)
        per_sample = flops["loft_worker_mean"] if a["method"] == "loft" else flops["dense"]
        total = per_sample * statistics.fmean(r["samples_total"] for r in mine)
        acc = _mean_std(accs)
        rows.append({"arm": arm, "n": acc["n"], "epochs": mine[0]["epochs"], "test_acc_mean": acc["mean"],
                     "test_acc_std": acc["std"],
                     "samples_per_worker": mine[0]["samples_per_worker"], "train_flops": total,
                     "sync_mib_per_rank": (0.0 if a["method"] != "loft" else flops["sync_bytes_per_round"][
                         a["optimizer_state"]] * mine[0]["samples_per_worker"] / (a["local_steps"] * args.batch_size)
                         / 2 ** 20),
                     "vs_dense": paired(accs, by_arm["dense"]) if "dense" in by_arm and arm != "dense" else None,
                     "vs_dense_same_settings": _same_settings(args, a, accs, by_arm),
                     "vs_dense_flops": (paired(accs, by_arm["dense-flops"])
                                        if "dense-flops" in by_arm and a["method"] == "loft" else None),
                     "vs_against_preset": paired(accs, against[arm]) if against and arm in against else None,
                     "against_preset_acc": _mean_std(against[arm]) if against and arm in against else None})
    return {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model, "preset": args.preset,
            "against_preset": args.against_preset or None,
            "workers": args.workers, "batch_size": args.batch_size, "lr": args.lr,
            "data": data_description(args),
            "flops_per_sample": flops, "rows": rows, "runs": runs}


def _against_cell(row: dict) -> str:
    acc = row.get("against_preset_acc")
    if not acc:
        return "-"
    return f"{acc['mean']:.2f} +- {acc['std']:.2f} (n={acc['n']}); {interval(row['vs_against_preset'])}"


def write_markdown(result: dict, path: str, command: str) -> None:
    dense = next((r for r in result["rows"] if r["arm"] == "dense"), None)
    other = result.get("against_preset")
    lines = ["# LoFT pretraining quality vs dense training", "",
             f"Written by `{command}` on {result['written']}. {result['model']} (preset {result['preset']}), "
             f"S={result['workers']}, batch {result['batch_size']}, lr {result['lr']} step schedule, "
             f"{result['data']}, one process per run (workers simulated).", "",
             "| arm | epochs | seeds | test acc % mean +- std | vs dense, points (paired, 95% CI) | "
             "vs dense at the arm's lr and epochs | vs dense-flops | samples per worker | training FLOPs (rel. dense) | "
             "sync MiB/rank |" + (f" the same arm under `{other}`: test acc %; this arm minus it (paired) |" if other else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if other else "")]
    for r in result["rows"]:
        rel = r["train_flops"] / dense["train_flops"] if dense else float("nan")
        lines.append(f"| {r['arm']} | {format_epochs(r['epochs'])} | {r['n']} | {r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f} | "
                     f"{interval(r['vs_dense'])} | {interval(r['vs_dense_same_settings'])} | {interval(r['vs_dense_flops'])} | "
                     f"{r['samples_per_worker']} | "
                     f"{rel:.2f} | {r['sync_mib_per_rank']:.0f} |" + (f" {_against_cell(r)} |" if other else ""))
    lines += ["", "`dense` and the LoFT arms process the same samples per worker; `dense-flops` spends the "
              "training FLOPs of LoFT at L=4 (3 x forward FLOPs per sample x samples). `sync MiB/rank`: "
              "what one rank sends in pretraining when the S workers are S processes (allgather, fp32; "
              "analytic, equal to the measured count); dense in one process sends nothing. "
              "Raw numbers: pretrain_quality.json."]
    if other:
        lines += ["", f"Last column: each LoFT arm against its finished runs of the same seeds under `--preset {other}` "
                  "(paired by seed over the seeds both have; dense runs are the same under every preset)."]
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="dense,loft-L4-reset,loft-L8-reset,loft-L4-carry,loft-L8-carry",
                        help="comma-separated: dense, dense-flops or loft-L<k>-<reset|carry>, each with an optional "
                        "-lr<x> (base lr) and -e<x> (epochs; a fraction trains that many epochs' rounds)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    add_pretraining_arguments(parser)
    parser.add_argument("--dense_flops", default="epochs", choices=("epochs", "rounds"),
                        help="the dense-flops arm's budget: the whole epochs nearest LoFT at L=4's "
                             "training FLOPs (epochs, at least 1), or exactly its FLOPs to a round (rounds)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one per CPU core)")
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "pretrain_quality"),
                        help="path prefix of the .json and .md written")
    parser.add_argument("--report_only", action="store_true", help="tables from finished runs, no training")
    from loft_ext.partition.plan import PRESETS

    parser.add_argument("--against_preset", default="", choices=("", *PRESETS),
                        help="also compare each LoFT arm with its finished runs of the same seeds under this preset "
                             "(paired by seed; run them with --preset first, nothing is trained for it)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        parse_arm(arm)
    if args.against_preset and args.against_preset == args.preset:
        raise SystemExit(f"error: --against_preset {args.against_preset} is the --preset itself: name another "
                         "preset to compare with, or leave --against_preset out")
    seeds = parse_seeds(args.seeds)
    make_fashion_subset(args.data_root, args.train_subset, args.test_subset)
    flops = costs(args)
    flops_epochs = dense_flops_epochs(args, flops)
    exact = loft_flops_in_dense_epochs(args, flops)
    jobs = [(arm, seed, flops_epochs if arm.startswith("dense-flops") else parse_arm(arm)["epochs"] or args.epochs)
            for arm in arms for seed in seeds]
    print(f"{len(jobs)} runs; training FLOPs per sample: dense {flops['dense'] / 1e6:.1f}M, LoFT worker "
          f"{flops['loft_worker_mean'] / 1e6:.1f}M; dense-flops = {format_epochs(flops_epochs)} epochs (LoFT at L=4 spends {exact:.2f} dense epochs' FLOPs)", flush=True)
    runs = []
    if args.report_only:
        runs = finished_runs(args, jobs)
    elif args.jobs <= 1:
        for job in jobs:
            runs.append(run_one(args, *job))
            print(f"[{len(runs)}/{len(jobs)}] {runs[-1]['arm']} seed {runs[-1]['seed']}: "
                  f"{100 * runs[-1]['test_acc']:.2f}% in {runs[-1]['wall_s']:.0f}s", flush=True)
    else:
        for run in pool_results(run_one, [(args, *job) for job in jobs], args.jobs):
            runs.append(run)
            print(f"[{len(runs)}/{len(jobs)}] {runs[-1]['arm']} seed {runs[-1]['seed']}: "
                  f"{100 * runs[-1]['test_acc']:.2f}% in {runs[-1]['wall_s']:.0f}s", flush=True)
    result = report(args, sorted(runs, key=lambda r: (r["arm"], r["seed"])), flops, against_preset_accuracies(args, jobs))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, args.results + ".md", "python benchmarks/pretrain_quality.py " + " ".join(argv or sys.argv[1:]))
    for r in result["rows"]:
        print(f"{r['arm']:<16} {r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f} (n={r['n']})  vs dense "
              f"{interval(r['vs_dense'])}  vs dense-flops {interval(r['vs_dense_flops'])}"
              + (f"  vs {args.against_preset} {interval(r['vs_against_preset'])}" if args.against_preset else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
