#!/usr/bin/env python
"""Which ticket regime tells a good ticket from a random one? (issue 16, items 1-3; `make ticket-regimes`)

The study's settings could not separate magnitude tickets from random ones, so "LoFT tickets equal dense
tickets" carried little information there. This sweep draws tickets in several regimes from the same
pretrained models and asks, per regime and sparsity, paired by seed with 95% t-intervals:

- control: do random masks trail magnitude masks? Each pretraining also gets a random ticket
  (``random:<source>``: the per-layer counts of its magnitude ticket, units or weights drawn at random;
  on the LoFT pretraining this is the study's ``random``). The regime discriminates when the dense
  pretraining's random ticket trails its magnitude ticket by >= 1 point with the 95% interval below 0
  (the same weights, only the mask differs); LoFT's random ticket against the dense ticket (the study's
  comparison) and against LoFT's own are reported beside it;
- parity: is the LoFT ticket within 0.5 point of the dense one (the interval's lower end >= -0.5)?

Regimes (``--regimes``; fine-tuning keeps the masks enforced, cosine lr, batch 64):

| regime | ticket | ratios (fraction removed) | starts from | fine-tuning |
|---|---|---|---|---|
| structured-oneshot | structured, L2 of producer filters | 0.5, 0.8 | pruned pretrained weights | none (one-shot; BN statistics re-estimated on 8 batches) |
| structured-ft1 | structured | 0.5, 0.8 | pruned pretrained weights | 1 epoch, lr 0.01 |
| unstructured-oneshot | unstructured | 0.5, 0.8, 0.9 | pruned pretrained weights | none (one-shot; BN statistics re-estimated on 8 batches) |
| unstructured-ft1 | unstructured | 0.9, 0.98, 0.99 | pruned pretrained weights | 1 epoch, lr 0.01 |
| unstructured-ft2 | unstructured, global magnitude | 0.9, 0.95, 0.98 | pruned pretrained weights | 2 epochs, lr 0.01 |
| unstructured-init-e5 | unstructured | 0.9, 0.98 | the initial weights (LTH rewinding) | 5 epochs, lr 0.05 |
| unstructured-rewind-e5 | unstructured | 0.9, 0.98 | the weights after ``--rewind_epoch`` epochs | 5 epochs, lr 0.05 |

Pretraining is benchmarks/pretrain_quality.py's (``--sources``: its arm names; the default ``dense`` and
``loft-L4-reset`` with ``--preset all``, the recipe's defaults when the sweep was first run; the tables of
2026-12-07 used ``--preset one_dim --sources dense,loft-L4-carry``, the defaults of 2026-12-06; today's preset is
``one_dim_flops``), with the same flags for model, data subset and
hyperparameters (one function adds them to both scripts) and the same output directory, so its finished
runs are reused and this sweep only draws and fine-tunes tickets. The
rewinding regime needs the weights after round k, which a pretraining saves only when it knows k before
it trains: its runs go to ``<output_dir>-rewind-e<x>`` (trained once more; k is the round that ends
``--rewind_epoch`` epochs at the source's L).

Budgets (item 3): every source pretrains for the same samples per worker (pretrain_quality: LoFT spends
0.99x dense's training FLOPs at S=2), every ticket of a regime fine-tunes for the same epochs; the bytes
one rank would send with S processes are pretrain_quality's ``sync MiB/rank`` (these runs simulate the
workers in one process, so their ``pretrain_bytes`` is 0).

    python benchmarks/ticket_regimes.py --jobs 2                         # the sweep, seeds 0-2
    python benchmarks/ticket_regimes.py --regimes unstructured-ft2 --seeds 0,1,2,3,4 --jobs 2

Finished pretrainings and tickets are skipped (they live in their runs' directories), so a rerun only
rebuilds the tables.

Writes ``--results`` (default docs/results/ticket_regimes.{json,md}).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pretrain_quality  # noqa: E402
from study import interval, make_fashion_subset, paired, parse_seeds, pool_results  # noqa: E402

REGIMES = {
    "structured-oneshot": {"ticket": "structured", "ratios": (0.5, 0.8), "finetune_epochs": 0},
    "structured-ft1": {"ticket": "structured", "ratios": (0.5, 0.8), "finetune_epochs": 1, "finetune_lr": 0.01},
    "unstructured-oneshot": {"ticket": "unstructured", "ratios": (0.5, 0.8, 0.9), "finetune_epochs": 0},
    "unstructured-ft1": {"ticket": "unstructured", "ratios": (0.9, 0.98, 0.99), "finetune_epochs": 1,
                         "finetune_lr": 0.01},
    "unstructured-ft2": {"ticket": "unstructured", "ratios": (0.9, 0.95, 0.98), "finetune_epochs": 2,
                         "finetune_lr": 0.01},
    "unstructured-init-e5": {"ticket": "unstructured", "ratios": (0.9, 0.98), "rewind": "init",
                             "finetune_epochs": 5, "finetune_lr": 0.05},
    "unstructured-rewind-e5": {"ticket": "unstructured", "ratios": (0.9, 0.98), "rewind": "round",
                               "finetune_epochs": 5, "finetune_lr": 0.05},
}


def random_label(source: str) -> str:
    """The control drawn on ``source``'s pretraining: its magnitude ticket's per-layer counts, at random."""
    return f"random:{source}"


def rewind_round(args, source: str) -> int:
    """The round that ends ``--rewind_epoch`` epochs at ``source``'s local steps (rounded up)."""
    batches = pretrain_quality.batches_per_epoch(args)
    return max(1, math.ceil(args.rewind_epoch * batches / pretrain_quality.parse_arm(source)["local_steps"]))


def ticket_hparams(args, regime: str, source: str, random: bool):
    from loft_ext.engine.pipeline import TicketHparams

    spec = dict(REGIMES[regime])
    if spec.get("rewind") == "round":
        spec["rewind_round"] = rewind_round(args, source)
    return TicketHparams(finetune_batch_size=args.batch_size, prune_score="random" if random else "auto", **spec)


def pretrain_hparams(args, source: str, seed: int, rewinding: bool):
    """pretrain_quality's hparams of ``source`` (its runs are reused), in the rewinding directory if asked."""
    hp = list(pretrain_quality.hparams(args, source, seed, pretrain_quality.parse_arm(source)["epochs"] or args.epochs))
    if rewinding:
        hp[5] = dataclasses.replace(hp[5], output_dir=args.output_dir + f"-rewind-e{args.rewind_epoch:g}")
    return hp


def run_task(args, source: str, seed: int, regimes: list[str]) -> list[dict]:
    """Every regime's tickets of one pretraining (one process: the pipeline calls of one run directory
    must not overlap, they merge into its summary.json)."""
    import torch

    from loft_ext.engine.pipeline import run_pipeline

    torch.set_num_threads(1)
    epochs = pretrain_quality.parse_arm(source)["epochs"] or args.epochs   # named by the pretraining's run directory:
    name = pretrain_quality.run_name(args, source, seed, epochs)            # other models or presets never share it
    log_path = os.path.join(args.output_dir, "logs", f"tickets-{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    out = []
    with open(log_path, "a") as log, contextlib.redirect_stderr(log):
        def say(*a, **k):
            log.write(" ".join(str(x) for x in a) + "\n")
            log.flush()
        for regime in regimes:
            pre = pretrain_hparams(args, source, seed, REGIMES[regime].get("rewind") == "round")
            labels = [(source, False), (random_label(source), True)]
            for label, random in labels:
                t0 = time.time()
                result = run_pipeline(*pre, ticket_hparams(args, regime, source, random), print_fn=say)
                for row in result["ticket_rows"]:
                    out.append({"regime": regime, "source": label, "seed": seed, "ratio": row["ratio"],
                                "test_acc": row["test_acc"], "pretrain_test_acc": row["pretrain_test_acc"],
                                "kept_params": row["kept_params"], "params": row["params"],
                                "pretrain_bytes": row["pretrain_bytes"], "finetune_wall_s": row["finetune_wall_s"],
                                "dir": os.path.relpath(row["dir"], ROOT)})
                say(f"{regime} {label} seed {seed}: {time.time() - t0:.0f}s")
    return out


def report(args, rows: list[dict], sources: list[str]) -> dict:
    dense, lofts = sources[0], sources[1:]
    cells = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        for ratio in sorted({r["ratio"] for r in rows if r["regime"] == regime}):
            acc: dict[str, dict[int, float]] = {}
            for r in rows:
                if (r["regime"], r["ratio"]) == (regime, ratio):
                    acc.setdefault(r["source"], {})[r["seed"]] = r["test_acc"]
            if dense not in acc:
                continue
            diffs = {f"{a} - {b}": paired(acc[a], acc[b]) for a, b in
                     [(random_label(dense), dense)]
                     + [(random_label(s), dense) for s in lofts] + [(random_label(s), s) for s in lofts]
                     + [(s, dense) for s in lofts] if a in acc and b in acc}
            control = diffs.get(f"{random_label(dense)} - {dense}")
            cells.append({
                "regime": regime, "ratio": ratio,
                "sources": {s: {"n": len(v), "mean": 100 * statistics.fmean(v.values()),
                                "std": 100 * statistics.stdev(v.values()) if len(v) > 1 else 0.0}
                            for s, v in acc.items()},
                "diffs": diffs,
                "discriminates": bool(control and control["ci95"] and control["mean"] <= -1.0
                                      and control["ci95"][1] < 0),
                "parity": {s: bool(d and d["ci95"] and d["ci95"][0] >= -0.5)
                           for s in lofts for d in [diffs.get(f"{s} - {dense}")]}})
    return {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model, "preset": args.preset,
            "workers": args.workers, "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
            "data": pretrain_quality.data_description(args),
            "sources": sources, "rewind_epoch": args.rewind_epoch,
            "regimes": {k: {**v, "ratios": list(v["ratios"])} for k, v in REGIMES.items()},
            "cells": cells, "tickets": rows}


def write_markdown(result: dict, path: str, command: str) -> None:
    sources = result["sources"]
    labels = sources + [random_label(s) for s in sources]
    dense = sources[0]
    diff_names = list(dict.fromkeys(k for c in result["cells"] for k in c["diffs"]))
    lines = ["# Ticket regimes: which one separates magnitude tickets from random ones?", "",
             f"Written by `{command}` on {result['written']}. {result['model']} (preset {result['preset']}) pretrained "
             f"{result['epochs']} epochs, S={result['workers']}, batch {result['batch_size']}, lr {result['lr']}, "
             f"{result['data']}. `random:<source>`: random masks with the per-layer counts of that pretraining's "
             "magnitude ticket, on its weights. Test accuracy of the ticket (fine-tuned as the regime says), % mean "
             "+- std (seeds); differences in points, paired by seed, 95% t-interval. The regime discriminates when "
             f"`{random_label(dense)} - {dense}` <= -1 with its interval below 0; parity: a LoFT ticket's interval "
             f"against {dense} has its lower end >= -0.5.", "",
             "| regime | r | " + " | ".join(labels) + " | " + " | ".join(f"`{d}`" for d in diff_names)
             + " | discriminates | parity |",
             "|---|---|" + "---|" * (len(labels) + len(diff_names) + 2)]
    for c in result["cells"]:
        accs = [f"{c['sources'][s]['mean']:.2f} +- {c['sources'][s]['std']:.2f}" if s in c["sources"] else "-"
                for s in labels]
        parity = ", ".join(s for s, ok in c["parity"].items() if ok) or "none"
        lines.append(f"| {c['regime']} | {c['ratio']:g} | " + " | ".join(accs) + " | "
                     + " | ".join(interval(c["diffs"].get(d)) for d in diff_names)
                     + f" | {'yes' if c['discriminates'] else 'no'} | {parity} |")
    n = sorted({c["sources"][s]["n"] for c in result["cells"] for s in c["sources"]})
    lines += ["", f"Seeds per cell: {', '.join(map(str, n))}. Regimes: benchmarks/ticket_regimes.py's docstring. "
              "Raw numbers: ticket_regimes.json.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default="structured-oneshot,structured-ft1,unstructured-oneshot,unstructured-ft1,"
                        "unstructured-ft2",
                        help=f"comma-separated, of: {', '.join(REGIMES)}")
    parser.add_argument("--sources", default="dense,loft-L4-reset",
                        help="pretrainings (pretrain_quality.py arm names), dense first; each also gets its random "
                        "control (random:<source>)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rewind_epoch", type=float, default=1.0, help="unstructured-rewind-e5: epochs rewound to")
    pretrain_quality.add_pretraining_arguments(parser)
    parser.add_argument("--jobs", type=int, default=1, help="pretrainings whose tickets run side by side")
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "ticket_regimes"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    regimes = [r for r in args.regimes.split(",") if r]
    sources = [s for s in args.sources.split(",") if s]
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise SystemExit(f"error: unknown regime(s) {', '.join(bad)}; choose from {', '.join(REGIMES)}")
    for s in sources:
        pretrain_quality.parse_arm(s)
    if len(sources) < 2 or pretrain_quality.parse_arm(sources[0])["method"] != "dense":
        raise SystemExit("error: --sources needs a dense arm first and at least one LoFT arm, e.g. dense,loft-L4-reset")
    seeds = parse_seeds(args.seeds)
    make_fashion_subset(args.data_root, args.train_subset, args.test_subset)
    jobs = [(source, seed, regimes) for seed in seeds for source in sources]
    rows = []
    if args.jobs <= 1:
        for job in jobs:
            rows += run_task(args, *job)
            print(f"[{job[0]} seed {job[1]}] done", flush=True)
    else:
        for done in pool_results(run_task, [(args, *job) for job in jobs], args.jobs):
            rows += done
            print(f"[{done[0]['source'] if done else '?'} seed {done[0]['seed'] if done else '?'}] done", flush=True)
    rows.sort(key=lambda r: (regimes.index(r["regime"]), r["ratio"], r["source"], r["seed"]))
    result = report(args, rows, sources)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results + ".json", "w") as f:
        json.dump(result, f, indent=1)
    command = "python benchmarks/ticket_regimes.py " + " ".join(argv or sys.argv[1:])
    write_markdown(result, args.results + ".md", command)
    with open(args.results + ".md") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
