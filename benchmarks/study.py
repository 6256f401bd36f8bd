#!/usr/bin/env python
"""Ticket-quality study (issues 7 and 16; `make study`): are LoFT tickets as good as dense-pretrained ones?

Methods, all on the same model, data, pretraining budget and fine-tuning budget:

| label | pretraining | ticket |
|---|---|---|
| loft-S2, loft-S4 | LoFT with S = 2 / 4 filter workers (`--method loft`; momentum carried across rounds, `--optimizer_state carry`, the better LoFT model on resnet10t and the recipe's default; ``--optimizer_state reset`` here runs the paper's setting) | unstructured: global magnitude of the conv/linear weights |
| dense | plain training of the full model (`--method dense`) | unstructured magnitude |
| earlybird | dense, stopped by the Early-Bird detector (`--method earlybird`) | unstructured magnitude |
| random | the loft-S2 run of the same budget (reused, not retrained) | loft-S2's per-layer counts, weights chosen at random (`--prune_score random`) |
| random-dense | the dense run of the same budget (reused) | dense's per-layer counts, chosen at random: the control that says whether the regime tells a magnitude ticket from a random one on the same weights |

The regime (unstructured tickets at 98% and 99% sparsity, fine-tuned 1 epoch from the pruned
pretrained weights) is the one benchmarks/ticket_regimes.py found to separate magnitude tickets from
random ones (docs/results/ticket_regimes.md); the setting (resnet10t, an 8,000 / 2,000-image stratified
Fashion-MNIST subset at 28 px, 10 epochs, preset `one_dim`) is benchmarks/pretrain_quality.py's.
Budgets are equal samples per worker (LoFT at S=2 spends 1.20x dense's training FLOPs under `one_dim`,
0.99x under `all`; docs/results/pretrain_quality-resnet10t-one_dim.md).

Budgets: ``fixed`` (every pretraining runs its full epochs; the detectors only report) and ``stop``
(LoFT and dense with `--distance_stop`: pretraining ends when the filter-distance rule fires; the
epochs stay the cap and the schedule). Early-Bird always stops on its own detector, so it belongs to
the ``stop`` budget only. Every pretraining is followed by one ticket per ratio (the fraction of
weights removed), each fine-tuned for the same epochs. The filter distance is recorded every 2 rounds
(1/16 epoch) and its rule compares the newest record with the last epoch's (`--distance_window_epochs
1`); in the stop budget it checks a record only once the step schedule's lr has fallen to half its
peak (`--distance_lr_below 0.5`: with the window alone it fired on the high-lr plateau on 4 of 15 runs);
Early-Bird checks at epoch ends, as published (`--detector_windows records`: both on a window of
5 records, the studies before 2026-12-07). The report sets the ticket drawn where a detector stopped
pretraining against the one drawn at the end of the full budget ("Early tickets"), and replays the
rule under other windows on the fixed budget's records ("Detector windows").

Fashion-MNIST comes from `make data-fashion-mnist`; the subset is written as its own
torchvision-layout folder under data/, so the runs need no option the pipeline lacks. Every
pretraining + tickets is one `run_pipeline` call in this process (workers simulated; world size 1
gives the same run as S processes); runs live in `<output_dir>/<model>-<hash>/` like any other run, so
re-running the study skips every finished pretraining and ticket: it can be stopped and resumed, or run
in pieces (`--seeds`, `--budgets`, `--methods`). `--jobs 2` runs two pipelines side by side.
Differences are paired by seed with 95% t-intervals, and the goals are judged on the intervals.

Outputs (`--results_dir`, default docs/results): study.json (configuration, every run, every ticket,
the per-cell statistics, the goals, early vs end, the replayed windows), study.md (tables), study_accuracy_vs_ratio.png and
study_distance_curves.png. `--report_only` rebuilds them from the finished runs without training.

  python benchmarks/study.py --jobs 2              # the full study (make study): 5 seeds, about 55 minutes
  python benchmarks/study.py --quick --jobs 2      # its first seed (make study-quick), about 11 minutes
  python benchmarks/study.py --model resnet14t --seeds 0,1,2 --jobs 2   # a second (Bottleneck) architecture
  python benchmarks/study.py --lr_schedule cosine --methods loft-S2,dense,random,random-dense --jobs 2
                                                   # the gated rule on a cosine schedule (docs/results/study-cosine)
  python benchmarks/study.py --smoke               # digits, one seed, tiny budgets (under 2 minutes)
  python benchmarks/study.py --plan                # list the pipeline calls and where they would go
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DataSpec:
    """One data set of the study and the budgets that depend on its size."""

    name: str
    dataset: str
    image_size: int
    epochs: int                 # pretraining epochs (fixed budget; the cap of the stop budget)
    detector_every: int         # rounds between filter-distance records and Early-Bird checks
    train_subset: int = 0       # fashion_mnist: stratified training subset (0 = all 60,000)
    test_subset: int = 0        # fashion_mnist: stratified test subset (0 = all 10,000)
    rounds: int = 0             # > 0: pretraining rounds instead of epochs (smoke only)


@dataclass(frozen=True)
class StudySpec:
    model: str
    preset: str
    local_steps: int
    batch_size: int
    lr: float
    seeds: tuple[int, ...]
    ratios: tuple[float, ...]
    finetune_epochs: int
    finetune_lr: float
    finetune_batch_size: int
    distance_window: int        # records compared by the filter-distance rule (when distance_window_epochs = 0)
    distance_eps: float
    earlybird_ratio: float
    bn_recalibration_batches: int
    datasets: tuple[DataSpec, ...]
    ticket: str = "structured"   # structured (channel units, L2 score) or unstructured (global weight magnitude)
    optimizer_state: str = "reset"  # of the LoFT pretrainings (dense ones always carry their momentum)
    distance_window_epochs: float = 0.0  # > 0: the filter-distance rule's window in epochs (replaces distance_window)
    earlybird_every: int = -1   # rounds between Early-Bird checks; 0 = epoch ends (its published setting); -1 = detector_every
    distance_lr_below: float = 1.0  # < 1: the stop budget's rule checks only once the lr fell to this fraction of its peak
    lr_schedule: str = "step"   # of every pretraining: step (/10 at 50% and 75%) or cosine (to 0)
    wandb_project: str = ""   # set by --wandb: every run logs into this W&B project, one group per cell


FULL = StudySpec(
    # the setting of docs/results/pretrain_quality.md (where LoFT's pretraining gap shows) and the regime
    # docs/results/ticket_regimes.md found to separate magnitude tickets from random ones
    model="resnet10t", preset="one_dim", local_steps=4, batch_size=64, lr=0.1, seeds=(0, 1, 2, 3, 4),
    ratios=(0.98, 0.99), ticket="unstructured", optimizer_state="carry", finetune_epochs=1, finetune_lr=0.01, finetune_batch_size=64,
    distance_window=5, distance_eps=0.1, earlybird_ratio=0.5, bn_recalibration_batches=8,
    # records every 2 rounds resolve the firing point; the rule compares the newest with the last epoch's
    # records (a window of 5 records, 10 rounds, fired at its first check on every run: a ranking barely
    # moves in 10 rounds); Early-Bird as published: a mask every epoch end, the last 5 compared
    distance_window_epochs=1.0, earlybird_every=0,
    # the rule fired on the high-lr plateau on 4 of 15 runs with the window alone (1.2-3.6 epochs, tickets
    # 1.4-5.0 points below the end's); the ranking settles at the first lr drop, so it is checked from there
    distance_lr_below=0.5,
    datasets=(
        # a stratified 8,000-image training / 2,000-image test subset at 28x28; 125 batches of 64 per worker
        # and epoch -> 32 rounds of L=4 per epoch; detectors every 2 rounds (1/16 epoch: the rules can fire
        # from round 10, 0.31 epochs, on, so a firing point later than that is resolved to 2 rounds)
        DataSpec("fashion_mnist", "fashion_mnist", image_size=28, epochs=10, detector_every=2, train_subset=8000,
                 test_subset=2000),
    ))

# `--quick`: the first seed of the full study (the same runs: a quick run is where the full one starts)
QUICK = dataclasses.replace(FULL, seeds=(0,))

SMOKE = dataclasses.replace(
    FULL, seeds=(0,), ratios=(0.5, 0.8), finetune_epochs=1, finetune_batch_size=256, distance_window=3,
    distance_window_epochs=0.0, earlybird_every=-1,
    bn_recalibration_batches=1, batch_size=32, local_steps=2,
    datasets=(DataSpec("digits", "digits", image_size=8, epochs=1, detector_every=1, rounds=4),))

# label -> (pretraining method, S); "random" / "random-dense" reuse loft-S2's / dense's pretraining
PRETRAININGS = {"loft-S2": ("loft", 2), "loft-S4": ("loft", 4), "dense": ("dense", 1),
                "earlybird": ("earlybird", 1)}
METHODS = ("loft-S2", "loft-S4", "dense", "earlybird", "random", "random-dense")
RANDOM_OF = {"loft-S2": "random", "dense": "random-dense"}   # the random control drawn on a pretraining
BUDGETS = ("fixed", "stop")


@dataclass(frozen=True)
class Task:
    """One pretraining and its tickets: one or two run_pipeline calls on the same run directory."""

    data: DataSpec
    budget: str
    pretraining: str      # a key of PRETRAININGS
    seed: int
    ticket_methods: tuple[str, ...]   # labels of the ticket rows drawn from this pretraining

    @property
    def key(self) -> str:
        return f"{self.data.name}/{self.budget}/{self.pretraining}/seed{self.seed}"


def make_tasks(spec: StudySpec, datasets, budgets, methods, seeds) -> list[Task]:
    tasks = []
    for data in spec.datasets:
        if data.name not in datasets:
            continue
        for seed in seeds:
            for budget in budgets:
                for pre in ("loft-S4", "loft-S2", "dense", "earlybird"):  # the longest first
                    if pre == "earlybird" and budget != "stop":
                        continue
                    labels = tuple(m for m in (pre, RANDOM_OF.get(pre)) if m in methods)
                    if labels:
                        tasks.append(Task(data, budget, pre, seed, labels))
    return tasks


def data_dir_of(data: DataSpec, data_root: str) -> str:
    if data.dataset != "fashion_mnist":
        return ""
    path = data_root if not data.train_subset and not data.test_subset else os.path.join(
        data_root, f"fashion_mnist-train{data.train_subset or 60000}-test{data.test_subset or 10000}")
    # relative to the checkout when inside it: the path is hashed into the run's name
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def wandb_group_of(task: Task) -> str:
    """The study cell a run belongs to on W&B: data set and budget (every method of a cell side by side)."""
    return f"{task.data.name}-{task.budget}"


def hparams_of(spec: StudySpec, task: Task, output_dir: str, data_root: str):
    """(pretraining hparams for run_pipeline, {ticket label: TicketHparams})."""
    from loft_ext.engine.pipeline import TicketHparams
    from loft_ext.engine.config import (DataHparams, DetectorHparams, LoftHparams, ModelHparams, OutputHparams,
                                        TrainHparams)

    method, workers = PRETRAININGS[task.pretraining]
    d = task.data
    stops = task.budget == "stop" and method in ("loft", "dense")
    pre = (
        ModelHparams(model=spec.model, preset=spec.preset),
        DataHparams(dataset=d.dataset, data_dir=data_dir_of(d, data_root), image_size=d.image_size,
                    batch_size=spec.batch_size),
        LoftHparams(workers=2 if method != "loft" else workers, local_steps=spec.local_steps, method=method,
                    # the setting does not apply to dense runs: they keep "reset", the value they were
                    # hashed (stored) with before the recipe's default became "carry"
                    optimizer_state=spec.optimizer_state if method == "loft" else "reset"),
        TrainHparams(epochs=d.epochs, rounds=d.rounds, lr=spec.lr, seed=task.seed, lr_schedule=spec.lr_schedule,
                     bn_recalibration_batches=spec.bn_recalibration_batches),
        DetectorHparams(distance_every=d.detector_every, distance_window=spec.distance_window,
                        distance_window_epochs=spec.distance_window_epochs, distance_eps=spec.distance_eps,
                        distance_stop=stops,
                        # only where the rule stops the run: the fixed budget's runs (and their run directories)
                        # stay those of the rule without it; their firing epoch is replayed (collect_run)
                        distance_lr_below=spec.distance_lr_below if stops else 1.0,
                        earlybird_ratio=spec.earlybird_ratio, earlybird_every=earlybird_every_of(spec, d),
                        # what run_pretrain sets for --method earlybird before it hashes the run
                        earlybird_stop=method == "earlybird"),
        # one W&B group per study cell (data set x budget); method, S and ratio are ticket-run config keys
        OutputHparams(output_dir=output_dir, tracker="wandb" if spec.wandb_project else "none",
                      wandb_project=spec.wandb_project or "loft_ext", wandb_group=wandb_group_of(task)),
    )
    tickets = {label: TicketHparams(ratios=spec.ratios, ticket=spec.ticket,
                                    prune_score="random" if label.startswith("random") else "auto",
                                    finetune_epochs=spec.finetune_epochs, finetune_lr=spec.finetune_lr,
                                    finetune_batch_size=spec.finetune_batch_size)
               for label in task.ticket_methods}
    return pre, tickets


def earlybird_every_of(spec: StudySpec, data: DataSpec) -> int:
    return data.detector_every if spec.earlybird_every < 0 else spec.earlybird_every


def earliest_firing(spec: StudySpec, data: DataSpec, rounds_per_epoch: int) -> tuple[float | None, float | None]:
    """The first epoch at which the filter-distance rule (of the stop budget) and Early-Bird can fire: once
    their windows are full (records every ``detector_every`` rounds; Early-Bird keeps 5 masks) and, with
    ``distance_lr_below`` < 1, the schedule's lr has fallen that far."""
    from loft_ext.engine.loop import lr_at
    from loft_ext.plugins.distance import lr_gate_open, window_indices

    every, first, rounds = data.detector_every, None, []
    total = data.rounds or data.epochs * rounds_per_epoch
    while every and first is None and every * (len(rounds) + 1) <= total:  # the plugin's own rule on the grid
        rounds.append(every * (len(rounds) + 1))
        lr = lr_at(rounds[-1] - 1, total, spec.lr, spec.lr_schedule)
        if (window_indices(rounds, spec.distance_window, spec.distance_window_epochs, rounds_per_epoch)
                and lr_gate_open(lr, spec.lr, spec.distance_lr_below)):
            first = rounds[-1] / rounds_per_epoch
    eb_every = earlybird_every_of(spec, data) or rounds_per_epoch
    return first, 5 * eb_every / rounds_per_epoch   # EarlyBird keeps 5 masks (its default, the study's)


def run_dir_of(pre, output_dir: str) -> str:
    """The run directory run_pretrain uses for a single-process run (the same as with S processes)."""
    from loft_ext.hparams import hparams_hash

    model_hp, data_hp, loft_hp, train_hp, det_hp, _ = pre
    return os.path.join(output_dir, f"{model_hp.model}-{hparams_hash(model_hp, data_hp, loft_hp, train_hp, det_hp)}")


def ticket_dir_of(run_dir: str, ticket_hp, ratio: float) -> str | None:
    from loft_ext.hparams import hparams_hash

    tid = hparams_hash(dataclasses.replace(ticket_hp, ratios=(ratio,)))
    found = glob.glob(os.path.join(run_dir, "tickets", f"*-r{ratio:g}-{tid}"))
    return found[0] if found else None


# ---------------------------------------------------------------------------------------- data
def prepare_data(spec: StudySpec, datasets, data_root: str) -> None:
    """Checks Fashion-MNIST and writes the stratified subsets the study uses (once)."""
    for d in spec.datasets:
        if d.name in datasets and d.dataset == "fashion_mnist":
            make_fashion_subset(data_root, d.train_subset, d.test_subset)


def _read_idx(path: str):
    import numpy as np

    with open(path, "rb") as f:
        raw = f.read()
    magic, n = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic == 2051:
        return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 28, 28)
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def _write_idx(path: str, array) -> None:
    header = (2051 if array.ndim == 3 else 2049).to_bytes(4, "big") + len(array).to_bytes(4, "big")
    if array.ndim == 3:
        header += array.shape[1].to_bytes(4, "big") + array.shape[2].to_bytes(4, "big")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header + array.tobytes())
    os.replace(tmp, path)


def make_fashion_subset(data_root: str, train: int, test: int) -> str:
    """<data_root>/fashion_mnist-train<N>-test<M>/FashionMNIST/raw/: the first N/10 (M/10) images of
    every class in a fixed permutation (seed 0) of the training (test) set, in torchvision's layout."""
    import numpy as np

    full = os.path.join(data_root, "FashionMNIST", "raw")
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if not all(os.path.isfile(os.path.join(full, n)) for n in names):
        raise SystemExit(f"error: Fashion-MNIST is not in {full}/; run `make data-fashion-mnist` "
                         f"(python3 scripts/fashion_mnist.py --data_dir {data_root}) first")
    if not train and not test:
        return data_root
    root = os.path.join(data_root, f"fashion_mnist-train{train or 60000}-test{test or 10000}")
    raw = os.path.join(root, "FashionMNIST", "raw")
    if all(os.path.isfile(os.path.join(raw, n)) for n in names):
        return root
    os.makedirs(raw, exist_ok=True)
    for prefix, size in (("train", train), ("t10k", test)):
        images = _read_idx(os.path.join(full, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(os.path.join(full, f"{prefix}-labels-idx1-ubyte"))
        if size:
            if size % 10:
                raise SystemExit(f"error: a Fashion-MNIST subset must be a multiple of 10 (got {size})")
            order = np.random.default_rng(0).permutation(len(labels))
            keep = np.sort(np.concatenate([order[labels[order] == c][:size // 10] for c in range(10)]))
            images, labels = images[keep], labels[keep]
        _write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), np.ascontiguousarray(images))
        _write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), np.ascontiguousarray(labels))
    return root


# ---------------------------------------------------------------------------------------- running
def pipeline_kwargs(run_pipeline) -> dict:
    """A checkpoint at every epoch end and when interrupted (SIGINT/SIGTERM), resume from the latest, and
    none kept once a pretraining has finished, where the installed pipeline has checkpointing; nothing
    otherwise. (Checkpoints are not hashed: the run directories are the same either way.)"""
    import inspect

    from loft_ext.engine import config as runner

    if "ckpt_hp" in inspect.signature(run_pipeline).parameters and hasattr(runner, "CheckpointHparams"):
        return {"ckpt_hp": runner.CheckpointHparams(checkpoint_every=0, resume="latest",
                                                     finished_run_checkpoints="delete")}
    return {}


def run_task(spec: StudySpec, task: Task, output_dir: str, data_root: str, log_dir: str, echo: bool) -> dict:
    """One pretraining and its tickets through loft_ext's run_pipeline; the pipeline's lines go to the
    task's log file (and to stdout with ``echo``). Finished stages are skipped by the pipeline."""
    try:
        return _run_task(spec, task, output_dir, data_root, log_dir, echo)
    except KeyboardInterrupt:
        return {"task": task.key, "interrupted": "interrupted (SIGINT)"}
    except Exception as exc:  # noqa: BLE001 - re-raised as one picklable error naming the task
        if type(exc).__name__ == "Preempted":  # SIGINT/SIGTERM in pretraining: it checkpointed and stopped
            return {"task": task.key, "interrupted": str(exc)}
        raise RuntimeError(f"{task.key}: {type(exc).__name__}: {exc}") from None


def _run_task(spec: StudySpec, task: Task, output_dir: str, data_root: str, log_dir: str, echo: bool) -> dict:
    import resource

    import torch

    from loft_ext.engine.pipeline import run_pipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pre, tickets = hparams_of(spec, task, output_dir, data_root)
    extra = pipeline_kwargs(run_pipeline)
    os.makedirs(log_dir, exist_ok=True)
    # named by the cell and the run directory: another variant's run of the same cell (--model, --preset,
    # --lr_schedule, ...) writes its own log
    log_path = os.path.join(log_dir, task.key.replace("/", "_") + f"_{os.path.basename(run_dir_of(pre, output_dir))}.log")
    t0 = time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with open(log_path, "a") as log:
        def say(*args, **kwargs):
            kwargs.pop("flush", None)
            line = " ".join(str(a) for a in args)
            log.write(line + "\n")
            log.flush()
            if echo:
                print(f"[{task.key}] {line}", flush=True)

        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {task.key}\n")
        redirect = contextlib.nullcontext() if echo else contextlib.redirect_stderr(log)
        with redirect:
            for label, ticket_hp in tickets.items():
                result = run_pipeline(*pre, ticket_hp, print_fn=say, **extra)
                expected = run_dir_of(pre, output_dir)
                if os.path.abspath(result["run_dir"]) != os.path.abspath(expected):
                    raise RuntimeError(f"run directory {result['run_dir']} differs from the study's {expected}")
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"task": task.key, "wall_s": time.time() - t0, "log": log_path,
            "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` as integers; anything else is one clear error."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"error: --seeds takes comma-separated integers such as 0,1,2 (got {text!r})") from None
    if not seeds:
        raise SystemExit("error: --seeds names no seed; pass e.g. --seeds 0,1,2")
    return seeds


def pool_results(fn, argsets: list[tuple], jobs: int):
    """``fn(*args)`` for every tuple of ``argsets`` in ``jobs`` spawned processes; yields the results as they
    finish. SIGTERM to this driver is passed on to the workers (a pretraining checkpoints at the end of its
    round and stops) and ends the loop as KeyboardInterrupt after they have stopped, so no worker outlives
    the driver (a worker whose parent died would otherwise wait for work forever)."""
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def forward(signum, frame):
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for future in as_completed([pool.submit(fn, *args) for args in argsets]):
            yield future.result()
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.shutdown(wait=True, cancel_futures=True)  # running pipelines end (or checkpoint) first


def run_tasks(spec: StudySpec, tasks: list[Task], output_dir: str, data_root: str, jobs: int, echo: bool) -> None:
    log_dir = os.path.join(output_dir, "logs")
    t_start = time.time()
    done = 0

    def report(info: dict) -> None:
        nonlocal done
        if "interrupted" in info:
            print(f"{info['task']}: {info['interrupted']}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        done += 1
        print(f"[{done}/{len(tasks)}] {info['task']} done in {info['wall_s']:.0f}s (cpu {info['cpu_s']:.0f}s; "
              f"study {time.time() - t_start:.0f}s; log {os.path.relpath(info['log'], ROOT)})", flush=True)

    if jobs <= 1:
        for task in tasks:
            report(run_task(spec, task, output_dir, data_root, log_dir, echo))
        return
    for info in pool_results(run_task, [(spec, task, output_dir, data_root, log_dir, False) for task in tasks], jobs):
        report(info)


# ---------------------------------------------------------------------------------------- collecting
def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


_BYTES_CACHE: dict = {}


def sync_bytes_per_round(spec: StudySpec, data: DataSpec, workers: int, optimizer_state: str = "reset") -> float:
    """Bytes one rank sends per round when the S workers are S processes (allgather, fp32, D=1; with
    ``carry`` the momentum moves with its parameter): the analytic count, which the measured count equals
    exactly (tests/test_distributed.py)."""
    key = (spec.model, spec.preset, data.dataset, data.image_size, workers, optimizer_state)
    if key not in _BYTES_CACHE:
        import torch

        from loft_ext.models import create_model
        from loft_ext.parallel.analytic import allgather_round_bytes
        from loft_ext.partition.plan import make_plan

        torch.manual_seed(0)
        model = create_model(spec.model, 10, 1)
        plan = make_plan(model, workers, spec.preset, (1, 1, data.image_size, data.image_size), spec.model)
        copies = 1 if optimizer_state == "carry" else 0
        _BYTES_CACHE[key] = allgather_round_bytes(model, plan, workers, 4, copies) if workers > 1 else 0.0
    return _BYTES_CACHE[key]


def collect_run(spec: StudySpec, task: Task, output_dir: str, data_root: str) -> tuple[dict | None, list[dict]]:
    """(pretraining record, ticket records) of a task from its run directory; (None, []) if unfinished."""
    pre, tickets = hparams_of(spec, task, output_dir, data_root)
    run_dir = run_dir_of(pre, output_dir)
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(summary_path):
        return None, []
    summary = _read_json(summary_path)
    rounds, epochs = summary["rounds_done"], summary["epochs_done"]
    per_epoch = rounds / epochs if epochs else float("nan")
    fired = {t["detector"]: t["round"] for t in summary.get("tickets", [])}
    curves = {"epoch": [], "consecutive": [], "to_last": [], "window_max_epoch": [], "window_max": []}
    replayed, emerged = {}, {}
    round_lines = _read_jsonl(os.path.join(run_dir, "rounds.jsonl"))
    lr_by_round = {line["step"]: line["lr"] for line in round_lines if "lr" in line}
    dist_path = os.path.join(run_dir, "distance", "distances.json")
    if os.path.isfile(dist_path):
        d = _read_json(dist_path)
        curves["epoch"] = [r / per_epoch for r in d["rounds"]]
        curves["consecutive"] = [None] + [c["aggregate"] for c in d["consecutive"]]
        curves["to_last"] = d["to_last"]["aggregate"]
        if epochs:
            replayed, emerged = replay_rules(d, round(per_epoch), lr_by_round)
            if task.budget == "fixed" and spec.distance_lr_below < 1:
                # these runs record without the gate (hparams_of): the study's rule, replayed
                e = replay_firing(d, round(per_epoch), lr_by_round, spec.distance_window,
                                  spec.distance_window_epochs, spec.distance_lr_below, spec.distance_eps)
                fired = {**{k: v for k, v in fired.items() if k != "distance_stop"},
                         **({"distance_stop": e * per_epoch} if e is not None else {})}
    for line in round_lines:
        if "distance/window_max" in line:
            curves["window_max_epoch"].append(line["step"] / per_epoch)
            curves["window_max"].append(line["distance/window_max"])
    method, workers = PRETRAININGS[task.pretraining]
    # the run's own optimizer state (summary.json has it since the default became carry; older runs: hparams)
    hparams_path = os.path.join(run_dir, "hparams.json")
    state = summary.get("optimizer_state") or (_read_json(hparams_path).get("LoftHparams", {}).get(
        "optimizer_state", "reset") if os.path.isfile(hparams_path) else "reset")
    per_round = sync_bytes_per_round(spec, task.data, workers if method == "loft" else 1, state)
    run = {
        "dataset": task.data.name, "budget": task.budget, "pretraining": task.pretraining, "seed": task.seed,
        "method": method, "S": summary["workers"], "optimizer_state": state, "run_dir": os.path.relpath(run_dir, ROOT),
        "rounds": rounds, "epochs": epochs, "rounds_per_epoch": per_epoch, "stopped_early": summary["stopped_early"],
        "distance_fired_epoch": fired["distance_stop"] / per_epoch if "distance_stop" in fired else None,
        "earlybird_fired_epoch": fired["earlybird"] / per_epoch if "earlybird" in fired else None,
        "pretrain_test_acc": summary["test_acc"], "pretrain_wall_s": summary["wall_s"],
        "sync_bytes_per_rank": per_round * rounds, "measured_sync_bytes": summary.get("sync_bytes_sent", 0.0),
        "test_acc_curve": [(m["round"] / per_epoch, m["test_acc"]) for m in
                           _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))],
        "distance": curves,
        # the filter-distance rule under other windows, replayed on this run's records (RULE_WINDOWS), and the
        # epoch from which the ranking stays within eps of the final one
        "replayed_fired_epoch": replayed, "emerged_epoch": emerged,
    }
    rows = []
    for label, ticket_hp in tickets.items():
        for ratio in spec.ratios:
            tdir = ticket_dir_of(run_dir, ticket_hp, ratio)
            if tdir is None or not os.path.isfile(os.path.join(tdir, "result.json")):
                continue
            r = _read_json(os.path.join(tdir, "result.json"))
            rows.append({
                "dataset": task.data.name, "budget": task.budget, "method": label, "pretraining": task.pretraining,
                "seed": task.seed, "ratio": ratio, "score": r["score"], "test_acc": r["test_acc"],
                "pretrain_test_acc": r.get("pretrain_test_acc"), "params": r["params"],
                "kept_params": r["kept_params"], "flops": r["flops"], "kept_flops": r["kept_flops"],
                "pretrain_epochs": epochs, "distance_fired_epoch": run["distance_fired_epoch"],
                "earlybird_fired_epoch": run["earlybird_fired_epoch"],
                "sync_bytes_per_rank": run["sync_bytes_per_rank"],
                # the random control reuses loft-S2's pretraining: these are that run's numbers
                "pretrain_wall_s": run["pretrain_wall_s"],
                "prune_wall_s": r.get("prune_wall_s"), "finetune_wall_s": r.get("finetune_wall_s"),
                "ticket_dir": os.path.relpath(tdir, ROOT),
            })
    return run, rows


# rules of the filter distance replayed on the fixed budget's records: (label, records, epochs, lr_below)
RULE_WINDOWS = (("5 records", 5, 0.0, 1.0), ("0.5 epoch", 5, 0.5, 1.0), ("1 epoch", 5, 1.0, 1.0),
                ("2 epochs", 5, 2.0, 1.0), ("0.5 epoch after lr drop", 5, 0.5, 0.5),
                ("1 epoch after lr drop", 5, 1.0, 0.5))
RULE_EPS = (0.1, 0.05)


def rule_key(label: str, eps: float) -> str:
    return f"{label}, eps {eps:g}"


def replay_firing(distances: dict, rounds_per_epoch: int, lr_by_round: dict[int, float], window: int,
                  window_epochs: float, lr_below: float, eps: float) -> float | None:
    """The epoch at which DistanceStop(window, eps, window_epochs, lr_below) fires on a run's recorded
    distances (None: never), with the plugin's own window and lr gate; ``lr_by_round``: each round's
    learning rate (rounds.jsonl), needed only with ``lr_below`` < 1."""
    from loft_ext.plugins.distance import lr_gate_open, window_indices

    rounds, layers = distances["rounds"], list(distances["pairwise"])
    peak, seen = 0.0, 0
    ordered = sorted(lr_by_round.items())
    for k in range(1, len(rounds) + 1):
        if lr_below < 1:
            while seen < len(ordered) and ordered[seen][0] <= rounds[k - 1]:
                peak = max(peak, ordered[seen][1])
                seen += 1
            if rounds[k - 1] not in lr_by_round:
                return None   # a round without its lr: the gate cannot be replayed
        older = window_indices(rounds[:k], window, window_epochs, rounds_per_epoch)
        if not older or (lr_below < 1 and not lr_gate_open(lr_by_round[rounds[k - 1]], peak, lr_below)):
            continue
        # the aggregate = FilterDistance.aggregate_between(k - 1, i)
        if max(sum(distances["pairwise"][name][k - 1][i] for name in layers) / len(layers) for i in older) < eps:
            return rounds[k - 1] / rounds_per_epoch
    return None


def replay_rules(distances: dict, rounds_per_epoch: int, lr_by_round: dict[int, float]) -> tuple[dict, dict]:
    """From a run's distances.json: the epoch at which DistanceStop would have fired under each rule of
    RULE_WINDOWS and eps of RULE_EPS (None: never; :func:`replay_firing`), and per eps the epoch from which
    the aggregate distance to the last record stays below eps (when the ranking the run ends with has
    emerged, seen in hindsight)."""
    rounds, layers = distances["rounds"], list(distances["pairwise"])
    n = len(rounds)
    if not layers or n < 2:
        return {}, {}
    fired = {rule_key(label, eps): replay_firing(distances, rounds_per_epoch, lr_by_round, records, epochs, below,
                                                 eps)
             for label, records, epochs, below in RULE_WINDOWS for eps in RULE_EPS}
    to_last = distances["to_last"]["aggregate"]
    emerged = {}
    for eps in RULE_EPS:
        k = n - 1
        while k > 0 and to_last[k - 1] < eps:
            k -= 1
        emerged[f"eps {eps:g}"] = rounds[k] / rounds_per_epoch
    return fired, emerged


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Per-seed differences a - b in points (accuracies in [0, 1]) over the seeds present in both: mean,
    standard deviation and 95% t-interval (None for the last two with one seed)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [100 * (a[s] - b[s]) for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))  # a float, not numpy: JSON
    return {"n": len(diffs), "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def interval(d: dict | None) -> str:
    """``+0.12 [-0.30, +0.54]`` (``(n=1)`` without an interval), ``-`` for no pair."""
    if not d:
        return "-"
    if d["ci95"] is None:
        return f"{d['mean']:+.2f} (n=1)"
    return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def _by_seed(cell: dict) -> dict[int, float]:
    return dict(zip(cell["seeds"], cell["test_acc"]))


def summarise(spec: StudySpec, runs: list[dict], rows: list[dict]) -> dict:
    cells = []
    for d in spec.datasets:
        for budget in BUDGETS:
            for method in METHODS:
                for ratio in spec.ratios:
                    key = (d.name, budget, method, ratio)
                    sel = [r for r in rows if (r["dataset"], r["budget"], r["method"], r["ratio"]) == key]
                    if not sel:
                        continue
                    accs = [r["test_acc"] for r in sel]
                    dist = [r["distance_fired_epoch"] for r in sel]
                    eb = [r["earlybird_fired_epoch"] for r in sel]
                    cells.append({
                        "dataset": d.name, "budget": budget, "method": method, "ratio": ratio, "n": len(sel),
                        "seeds": [r["seed"] for r in sel], "test_acc_mean": _mean(accs), "test_acc_std": _std(accs),
                        "test_acc": accs, "pretrain_test_acc_mean": _mean([r["pretrain_test_acc"] for r in sel]),
                        "pretrain_epochs_mean": _mean([r["pretrain_epochs"] for r in sel]),
                        "distance_fired_epoch_mean": _mean(dist), "distance_fired": sum(v is not None for v in dist),
                        "distance_fired_epoch": dist,
                        "earlybird_fired_epoch_mean": _mean(eb), "earlybird_fired": sum(v is not None for v in eb),
                        "earlybird_fired_epoch": eb,
                        "kept_params": _mean([r["kept_params"] for r in sel]), "params": sel[0]["params"],
                        "kept_flops": _mean([r["kept_flops"] for r in sel]), "flops": sel[0]["flops"],
                        "sync_mib_per_rank_mean": _mean([r["sync_bytes_per_rank"] / 2 ** 20 for r in sel]),
                        "pretrain_wall_s_mean": _mean([r["pretrain_wall_s"] for r in sel]),
                        "prune_wall_s_mean": _mean([r["prune_wall_s"] for r in sel]),
                        "finetune_wall_s_mean": _mean([r["finetune_wall_s"] for r in sel]),
                    })
    return {"cells": cells, "goals": goals(spec, runs, cells), "early_vs_end": early_vs_end(spec, runs, cells),
            "detector_windows": detector_windows(spec, runs)}


def detector_windows(spec: StudySpec, runs: list[dict]) -> list[dict]:
    """Issue 16, item 4 (resolution): per data set, fixed-budget pretraining and rule (window x eps), the
    mean epoch at which the filter-distance rule fires when replayed on the run's records (a rule that
    never fires counts at the cap, as in the goals), and the epoch the final ranking emerged."""
    out = []
    for d in spec.datasets:
        for pre in ("loft-S2", "loft-S4", "dense"):
            sel = [r for r in runs if (r["dataset"], r["budget"], r["pretraining"]) == (d.name, "fixed", pre)
                   and r.get("replayed_fired_epoch")]
            if not sel:
                continue
            cap = d.rounds / sel[0]["rounds_per_epoch"] if d.rounds else d.epochs
            row = {"dataset": d.name, "pretraining": pre, "n": len(sel), "fired_epoch_mean": {}, "never_fired": {},
                   "emerged_epoch_mean": {}}
            for key in sel[0]["replayed_fired_epoch"]:
                values = [r["replayed_fired_epoch"][key] for r in sel]
                row["fired_epoch_mean"][key] = _mean([cap if v is None else v for v in values])
                row["never_fired"][key] = sum(v is None for v in values)
            for key in sel[0]["emerged_epoch"]:
                row["emerged_epoch_mean"][key] = _mean([r["emerged_epoch"][key] for r in sel])
            out.append(row)
    return out


def early_vs_end(spec: StudySpec, runs: list[dict], cells: list[dict]) -> list[dict]:
    """Item 4 of issue 16: is the ticket drawn where the detector stopped pretraining as good as the one
    drawn at the end of the full budget? Per method and ratio: the stop budget's ticket minus the fixed
    budget's (paired by seed), with the epochs the detectors fired at and the earliest epoch they could
    have (once their windows are full: :func:`earliest_firing`)."""
    out = []
    for d in spec.datasets:
        per_epoch = [r["rounds_per_epoch"] for r in runs if r["dataset"] == d.name]
        earliest, earliest_eb = earliest_firing(spec, d, per_epoch[0]) if per_epoch else (None, None)
        for method in METHODS:
            for ratio in spec.ratios:
                stop, fixed = _cell(cells, d.name, "stop", method, ratio), _cell(cells, d.name, "fixed", method, ratio)
                if not stop:
                    continue
                base = fixed or _cell(cells, d.name, "fixed", "dense", ratio)  # Early-Bird: against dense's end
                out.append({"dataset": d.name, "method": method, "ratio": ratio,
                            "against": method if fixed else "dense", "stop_epochs": stop["pretrain_epochs_mean"],
                            "distance_fired_epoch": stop["distance_fired_epoch_mean"],
                            "earlybird_fired_epoch": stop["earlybird_fired_epoch_mean"],
                            "earliest_possible_epoch": earliest, "earliest_possible_earlybird_epoch": earliest_eb,
                            "stop_minus_end": paired(_by_seed(stop), _by_seed(base)) if base else None})
    return out


def _cell(cells, dataset, budget, method, ratio):
    for c in cells:
        if (c["dataset"], c["budget"], c["method"], c["ratio"]) == (dataset, budget, method, ratio):
            return c
    return None


def _trails(gap: dict) -> bool:
    """A control is beaten by a mean of >= 1 point with the 95% interval above 0 (one seed: the mean)."""
    return gap["mean"] >= 1.0 and (gap["ci95"] is None or gap["ci95"][0] > 0)


def goals(spec: StudySpec, runs: list[dict], cells: list[dict]) -> list[dict]:
    """The targets, per data set and budget, judged on the per-seed differences: a parity goal on the upper
    end of their 95% t-interval, the random control on their mean and the interval's lower end (with one
    seed: on the difference itself)."""
    out = []
    for d in spec.datasets:
        for budget in BUDGETS:
            for method in ("loft-S2", "loft-S4"):
                for ratio in spec.ratios:
                    a, b = _cell(cells, d.name, budget, method, ratio), _cell(cells, d.name, budget, "dense", ratio)
                    if a and b:  # judged on the upper end of the paired 95% interval (the mean with one seed)
                        gap = paired(_by_seed(b), _by_seed(a))
                        worst = gap["ci95"][1] if gap["ci95"] else gap["mean"]
                        out.append({"goal": "LoFT ticket within 0.5 point of the dense ticket", "dataset": d.name,
                                    "budget": budget, "method": method, "ratio": ratio, "paired": gap,
                                    "value": f"dense - {method} = {interval(gap)} points (paired by seed, 95% CI)",
                                    "met": worst <= 0.5})
            for ratio in spec.ratios:  # does the regime tell a magnitude ticket from a random one?
                a, b = _cell(cells, d.name, budget, "dense", ratio), _cell(cells, d.name, budget, "random-dense", ratio)
                if a and b:  # a mean of >= 1 point and an interval above 0
                    gap = paired(_by_seed(a), _by_seed(b))
                    out.append({"goal": "random ticket trails the dense ticket by >= 1 point (same pretraining)",
                                "dataset": d.name, "budget": budget, "method": "random-dense", "ratio": ratio,
                                "paired": gap, "value": f"dense - random-dense = {interval(gap)} points (paired by "
                                "seed, 95% CI)", "met": _trails(gap)})
            top = max(spec.ratios)
            a, b = _cell(cells, d.name, budget, "loft-S2", top), _cell(cells, d.name, budget, "random", top)
            if a and b:
                gap = paired(_by_seed(a), _by_seed(b))
                out.append({"goal": f"random ticket trails LoFT's by >= 1 point at r={top:g}", "dataset": d.name,
                            "budget": budget, "method": "random", "ratio": top, "paired": gap,
                            "value": f"loft-S2 - random = {interval(gap)} points (paired by seed, 95% CI)",
                            "met": _trails(gap)})
        # the detector comparison uses the fixed budget: both runs see every record up to the cap
        dense = [r for r in runs if (r["dataset"], r["budget"], r["pretraining"]) == (d.name, "fixed", "dense")]
        for method in ("loft-S2", "loft-S4"):
            loft = [r for r in runs if (r["dataset"], r["budget"], r["pretraining"]) == (d.name, "fixed", method)]
            if not dense or not loft:
                continue
            cap = d.rounds / dense[0]["rounds_per_epoch"] if d.rounds else d.epochs
            # a detector that never fired counts as firing at the cap (a lower bound on its epoch)
            def fired(rs):
                return [cap if r["distance_fired_epoch"] is None else r["distance_fired_epoch"] for r in rs]

            e_dense, e_loft = _mean(fired(dense)), _mean(fired(loft))
            never = [name for name, rs in (("dense", dense), (method, loft))
                     if any(r["distance_fired_epoch"] is None for r in rs)]
            note = (f" (did not fire within {cap:g} epochs in some seeds of: {', '.join(never)}; counted at the cap)"
                    if never else "")
            out.append({"goal": "filter-distance rule fires on LoFT at <= 0.6x dense's epoch", "dataset": d.name,
                        "budget": "fixed", "method": method, "ratio": None,
                        "value": f"{method} {e_loft:.2f} / dense {e_dense:.2f} = {e_loft / e_dense:.2f}x{note}",
                        "met": e_loft <= 0.6 * e_dense})
    return out


# ---------------------------------------------------------------------------------------- writing
COLORS = {"loft-S2": "tab:blue", "loft-S4": "tab:cyan", "dense": "tab:red", "earlybird": "tab:orange",
          "random": "tab:gray", "random-dense": "tab:brown"}


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if any(not label.startswith("eps") for label in labels):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes, fontsize=9)


def plot_accuracy(spec: StudySpec, cells: list[dict], path: str) -> None:
    from loft_ext.plotting import plt

    names = [d.name for d in spec.datasets]
    fig, axes = plt.subplots(len(BUDGETS), len(names), figsize=(4.6 * len(names), 3.4 * len(BUDGETS)), squeeze=False)
    for j, name in enumerate(names):
        for i, budget in enumerate(BUDGETS):
            ax = axes[i][j]
            for k, method in enumerate(METHODS):
                sel = sorted((c for c in cells if (c["dataset"], c["budget"], c["method"]) == (name, budget, method)),
                             key=lambda c: c["ratio"])
                if not sel:
                    continue
                x = [c["ratio"] + 0.006 * (k - 2) for c in sel]  # small offsets so error bars do not overlap
                ax.errorbar(x, [100 * c["test_acc_mean"] for c in sel], yerr=[100 * c["test_acc_std"] for c in sel],
                            marker="o", markersize=4, capsize=3, color=COLORS[method], label=method)
            ax.set_title(f"{name}, {budget} budget", fontsize=9)
            ax.set_xlabel("pruning ratio r (fraction of units removed)")
            ax.set_ylabel("ticket test accuracy (%)")
            ax.set_xticks(list(spec.ratios))
            ax.grid(alpha=0.3)
            _legend(ax)
    fig.suptitle(f"{spec.model} {spec.ticket} tickets, {spec.finetune_epochs} fine-tuning epochs\n"
                 f"(mean +- std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_curve(curves: list[tuple[list, list]]):
    """Mean and std over seeds of curves sampled at the same x (the shortest length wins)."""
    curves = [(x, y) for x, y in curves if x]
    if not curves:
        return [], [], []
    n = min(len(x) for x, _ in curves)
    xs = curves[0][0][:n]
    ys = [[y[i] for _, y in curves if y[i] is not None] for i in range(n)]
    keep = [i for i in range(n) if ys[i]]
    return [xs[i] for i in keep], [_mean(ys[i]) for i in keep], [_std(ys[i]) for i in keep]


def plot_distances(spec: StudySpec, runs: list[dict], path: str) -> None:
    from loft_ext.plotting import plt

    names = [d.name for d in spec.datasets]
    fig, axes = plt.subplots(2, len(names), figsize=(4.8 * len(names), 6.4), squeeze=False)
    for j, name in enumerate(names):
        top, bottom = axes[0][j], axes[1][j]
        for pre in ("loft-S2", "loft-S4", "dense"):
            sel = [r for r in runs if (r["dataset"], r["budget"], r["pretraining"]) == (name, "fixed", pre)]
            if not sel:
                continue
            color = COLORS[pre]
            x, m, s = _mean_curve([(r["distance"]["epoch"], r["distance"]["consecutive"]) for r in sel])
            if x:
                top.plot(x, m, marker="o", markersize=3, color=color, label=pre)
                top.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color,
                                 alpha=0.15)
            x, m, s = _mean_curve([(r["distance"]["window_max_epoch"], r["distance"]["window_max"]) for r in sel])
            if x:
                bottom.plot(x, m, marker="o", markersize=3, color=color, label=pre)
                bottom.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color,
                                    alpha=0.15)
            fired = _mean([r["distance_fired_epoch"] for r in sel])
            if fired is not None:
                bottom.axvline(fired, color=color, linestyle=":", linewidth=1)
        bottom.axhline(spec.distance_eps, color="black", linestyle="--", linewidth=1,
                       label=f"eps = {spec.distance_eps:g}")
        top.set_title(f"{name}: consecutive records", fontsize=9)
        bottom.set_title(f"{name}: rule statistic (max over {window_text(spec)})\n"
                         f"dotted: mean epoch the rule fired", fontsize=9)
        for ax in (top, bottom):
            ax.set_xlabel("epoch")
            ax.set_ylabel("normalised filter distance")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(0, 1.5)
            ax.grid(alpha=0.3)
            _legend(ax)
    fig.suptitle("filter distance, LoFT vs dense, fixed budget\n(aggregate over the split layers; mean +- std "
                 "over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def window_text(spec: StudySpec) -> str:
    return (f"{spec.distance_window_epochs:g} epoch(s)" if spec.distance_window_epochs > 0
            else f"{spec.distance_window} records")


def gate_text(spec: StudySpec) -> str:
    return (f", checked once the lr is at most {spec.distance_lr_below:g}x its peak (stop budget; the fixed budget's "
            "firing epoch is this rule replayed on its records)" if spec.distance_lr_below < 1 else "")


def _fmt(value, fmt="{:.2f}", none="-"):
    return none if value is None else fmt.format(value)


def write_markdown(spec: StudySpec, result: dict, path: str, smoke: bool, missing: list[str]) -> None:
    command = " ".join(["python benchmarks/study.py", *result.get("argv", [])])
    cells, runs = result["summary"]["cells"], result["runs"]
    lines = [f"# Ticket study{' (smoke run: tiny budgets, not results)' if smoke else ''}", "",
             f"Written by `{command}` on {result['written']}. "
             "Raw numbers: study.json. Setup: docs/results.md, section \"Ticket study\".", ""]
    if missing:
        lines += [f"**Incomplete**: {len(missing)} of {len(missing) + len(runs)} pretraining runs are not "
                  f"finished yet (listed in study.json, `missing_runs`); run the command that wrote it (without the pieces it left out) to continue.", ""]
    lines += ["Setup: " + ", ".join(
        [f"{spec.model} (preset `{spec.preset}`)", f"L={spec.local_steps}",
         "LoFT optimizer state " + ("/".join(sorted({r.get("optimizer_state") or "?" for r in runs
                                                     if r["method"] == "loft"})) or "-"),
         f"batch {spec.batch_size}",
         f"lr {spec.lr} {spec.lr_schedule} schedule", f"seeds {','.join(map(str, spec.seeds))}",
         f"{spec.ticket} tickets at r = {', '.join(f'{r:g}' for r in spec.ratios)}",
         f"fine-tuning {spec.finetune_epochs} epochs (lr {spec.finetune_lr}, cosine, batch {spec.finetune_batch_size})",
         f"filter-distance rule: window {window_text(spec)}, eps {spec.distance_eps:g}{gate_text(spec)}",
         "Early-Bird: a mask " + (f"every {spec.earlybird_every} rounds" if spec.earlybird_every > 0 else
                                  "every epoch end" if spec.earlybird_every == 0 else "at every detector record")
         + f", the last 5 within 0.1 (p = {spec.earlybird_ratio:g})"]) + ".", ""]
    for d in spec.datasets:
        sub = (f", training subset {d.train_subset}" if d.train_subset else "") + \
              (f", test subset {d.test_subset}" if d.test_subset else "")
        budget = f"{d.rounds} rounds" if d.rounds else f"{d.epochs} epochs"
        lines += [f"## {d.name} ({d.image_size}x{d.image_size}{sub}; pretraining {budget}; detectors every "
                  f"{d.detector_every} rounds)", ""]
        for budget in BUDGETS:
            sel = [c for c in cells if (c["dataset"], c["budget"]) == (d.name, budget)]
            if not sel:
                continue
            title = ("fixed budget" if budget == "fixed"
                     else "detector stop (LoFT/dense: filter distance; Early-Bird: its own)")
            lines += [f"### {title}", "",
                      "| method | r | ticket test acc (%) mean +- std (n) | vs dense (points, paired by seed, 95% CI) | kept params (M) | "
                      "pretrain epochs | distance fired @ epoch | Early-Bird fired @ epoch | sync MiB/rank (S procs) | "
                      "pretrain s | fine-tune s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in sel:
                dense = _cell(cells, d.name, budget, "dense", c["ratio"])
                delta = paired(_by_seed(c), _by_seed(dense)) if dense and c["method"] != "dense" else None
                fired = lambda k: (f"{_fmt(c[k + '_epoch_mean'])} ({c[k]}/{c['n']})" if c[k] else f"- (0/{c['n']})")
                lines.append(
                    f"| {c['method']} | {c['ratio']:g} | "
                    f"{100 * c['test_acc_mean']:.2f} +- {100 * c['test_acc_std']:.2f} ({c['n']}) | "
                    f"{interval(delta)} | {c['kept_params'] / 1e6:.3f} of {c['params'] / 1e6:.3f} | "
                    f"{_fmt(c['pretrain_epochs_mean'])} | {fired('distance_fired')} | {fired('earlybird_fired')} | "
                    f"{c['sync_mib_per_rank_mean']:.0f} | {_fmt(c['pretrain_wall_s_mean'], '{:.0f}')} | "
                    f"{_fmt(c['finetune_wall_s_mean'], '{:.0f}')} |")
            lines.append("")
    early = result["summary"].get("early_vs_end", [])
    if early:
        lines += ["## Early tickets: detector stop vs the full budget", "",
                  "The ticket drawn where the detector ended pretraining minus the ticket drawn after the full "
                  "budget (same method, ratio and fine-tuning; paired by seed; Early-Bird has no full-budget run of "
                  "its own and is compared with dense's). `earliest`: the first epoch at which the filter-distance rule / "
                  "Early-Bird could fire (once its window is full); a detector that fires there is limited by its "
                  "window, not by the training.", "",
                  "| data set | method | r | stopped @ epoch | distance fired @ | Early-Bird fired @ | earliest | "
                  "stop - end (points, 95% CI) |", "|---|---|---|---|---|---|---|---|"]
        for e in early:
            lines.append(f"| {e['dataset']} | {e['method']}{'' if e['against'] == e['method'] else ' (vs dense)'} | "
                         f"{e['ratio']:g} | {_fmt(e['stop_epochs'])} | {_fmt(e['distance_fired_epoch'])} | "
                         f"{_fmt(e['earlybird_fired_epoch'])} | {_fmt(e['earliest_possible_epoch'])} / "
                         f"{_fmt(e.get('earliest_possible_earlybird_epoch'))} | "
                         f"{interval(e['stop_minus_end'])} |")
        lines.append("")
    windows = result["summary"].get("detector_windows", [])
    if windows:
        keys = list(windows[0]["fired_epoch_mean"])
        lines += ["## Detector windows, replayed on the fixed budget's records", "",
                  "The epoch at which the filter-distance rule fires under other windows (records every "
                  f"{spec.datasets[0].detector_every} rounds; `N records`: the newest against the last N-1, "
                  "`E epoch(s)`: against every record of the last E epochs; `after lr drop`: a record is checked "
                  "only once the lr is at most half its peak), replayed on each run's recorded "
                  "distances with the plugin's own window and gate, mean over seeds (never fired: counted at the cap, "
                  "marked `*`); `emerged`: the epoch from which the ranking stays within eps of the final one "
                  "(hindsight). The study's own rule: window " + window_text(spec) + f", eps {spec.distance_eps:g}"
                  + gate_text(spec) + ".", "",
                  "| data set | pretraining | " + " | ".join(keys) + " | emerged, eps " +
                  " / ".join(k.split()[-1] for k in windows[0]["emerged_epoch_mean"]) + " |",
                  "|---|---|" + "---|" * (len(keys) + 1)]
        for w in windows:
            cells_text = [_fmt(w["fired_epoch_mean"][k]) + ("*" if w["never_fired"][k] else "") for k in keys]
            lines.append(f"| {w['dataset']} | {w['pretraining']} | " + " | ".join(cells_text) + " | " +
                         " / ".join(_fmt(v) for v in w["emerged_epoch_mean"].values()) + " |")
        lines.append("")
    lines += ["## Goals (issue 7, 16)", "", "| goal | data set | budget | method | r | value | met |",
              "|---|---|---|---|---|---|---|"]
    for g in result["summary"]["goals"]:
        lines.append(f"| {g['goal']} | {g['dataset']} | {g['budget']} | {g['method']} | "
                     f"{'-' if g['ratio'] is None else format(g['ratio'], 'g')} | {g['value']} | "
                     f"{'yes' if g['met'] else '**no**'} |")
    lines += ["", "Goals are judged on the differences paired by seed: LoFT vs dense on the upper end of "
              "their 95% t-interval, the random control on their mean and the interval's lower end.", "",
              "Columns: `distance fired` / `Early-Bird fired`: mean epoch at which the detector fired, over "
              "the seeds where it did (how many in brackets); in the fixed budget the detectors only report. "
              "`sync MiB/rank`: what one rank sends in pretraining when the S workers are S processes "
              "(allgather, fp32; the analytic count, equal to the measured one); dense and Early-Bird train "
              "one model in one process and send nothing. `random` / `random-dense` tickets are drawn from "
              "loft-S2's / dense's pretraining of the same seed and budget (the same run: its epochs, detectors, "
              "bytes and pretraining time are that run's), with the per-layer counts of that run's ticket. Times are wall seconds of one single-threaded pipeline "
              "(longer when the cores are shared).", "",
              "![accuracy vs ratio](study_accuracy_vs_ratio.png)", "",
              "![filter distance](study_distance_curves.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_outputs(spec: StudySpec, tasks: list[Task], output_dir: str, data_root: str, results_dir: str,
                  smoke: bool, argv: list[str] | None = None) -> dict:
    runs, rows, missing = [], [], []
    for task in tasks:
        run, task_rows = collect_run(spec, task, output_dir, data_root)
        if run is None:
            missing.append(task.key)
            continue
        runs.append(run)
        rows += task_rows
    result = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": list(argv or []), "smoke": smoke,
              "config": dataclasses.asdict(spec),
              "output_dir": os.path.relpath(output_dir, ROOT), "missing_runs": missing, "runs": runs, "tickets": rows}
    result["summary"] = summarise(spec, runs, rows)
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "study.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(spec, result, os.path.join(results_dir, "study.md"), smoke, missing)
    plot_accuracy(spec, result["summary"]["cells"], os.path.join(results_dir, "study_accuracy_vs_ratio.png"))
    plot_distances(spec, runs, os.path.join(results_dir, "study_distance_curves.png"))
    return result


def print_summary(result: dict) -> None:
    cells = result["summary"]["cells"]
    print(f"{'data set':<14} {'budget':<6} {'method':<10} {'r':>4} {'acc % (mean +- std, n)':>24} "
          f"{'pre-ep':>6} {'dist@ep':>7} {'EB@ep':>6}")
    for c in cells:
        print(f"{c['dataset']:<14} {c['budget']:<6} {c['method']:<10} {c['ratio']:>4g} "
              f"{100 * c['test_acc_mean']:>14.2f} +- {100 * c['test_acc_std']:4.2f} ({c['n']}) "
              f"{_fmt(c['pretrain_epochs_mean']):>6} {_fmt(c['distance_fired_epoch_mean']):>7} "
              f"{_fmt(c['earlybird_fired_epoch_mean']):>6}")
    for g in result["summary"]["goals"]:
        where = ", ".join([g["dataset"], g["budget"], g["method"]] + ([f"r={g['ratio']:g}"] if g["ratio"] else []))
        print(f"goal: {g['goal']} [{where}]: {g['value']} -> {'met' if g['met'] else 'NOT met'}")


# ---------------------------------------------------------------------------------------- main
def results_variant(spec: StudySpec, detector_windows: str) -> str:
    """The suffix of docs/results/study-<suffix>/ for a study other than the main one ('' for the main one):
    another model, preset, window or gate writes beside the main tables, never over them (the records
    windows' own gate is 1: theirs are the studies from before the gate)."""
    gate = 1.0 if detector_windows == "records" else FULL.distance_lr_below
    return "-".join(x for x, main in ((spec.model, FULL.model), (spec.preset, FULL.preset),
                                      (spec.lr_schedule, FULL.lr_schedule), (detector_windows, "epochs"),
                                      (f"lr_below{spec.distance_lr_below:g}", f"lr_below{gate:g}")) if x != main)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="digits only, one seed, tiny budgets (< 2 minutes)")
    parser.add_argument("--quick", action="store_true", help="the full study's first seed only (11 minutes "
                        "on 2 cores with --jobs 2; the same runs, so the full study continues from it); results "
                        "in <output_dir>/results-quick unless --results_dir")
    parser.add_argument("--model", default="", help="another timm model than the study's (e.g. resnet14t, a "
                        "Bottleneck ResNet); results in docs/results/study-<model>[-<preset>]/ unless --results_dir")
    from loft_ext.partition.plan import PRESETS

    parser.add_argument("--preset", default="", choices=("", *PRESETS),
                        help="partition preset of every pretraining (default: the study's; it also decides the "
                             "layers the filter distance watches, so dense runs depend on it too)")
    parser.add_argument("--optimizer_state", default="", choices=("", "reset", "carry"),
                        help="of the LoFT pretrainings (default: the study's, carry: the better LoFT model on "
                             "resnet10t, docs/results.md 'Pretraining quality')")
    parser.add_argument("--detector_windows", default="epochs", choices=("epochs", "records"),
                        help="epochs: the filter-distance rule over the last epoch of records, Early-Bird at epoch "
                             "ends (the study's); records: a 5-record window and Early-Bird on the records' grid "
                             "(the studies written before 2026-12-07; results in a -records variant)")
    parser.add_argument("--distance_lr_below", type=float, default=None,
                        help=f"the stop budget's filter-distance rule checks a record only once the lr is at most this "
                             f"fraction of its peak (default: the study's, {FULL.distance_lr_below:g}; 1 = always: the "
                             "study before 2026-12-07, results in an -lr_below1 variant)")
    parser.add_argument("--lr_schedule", default="", choices=("", "step", "cosine"),
                        help="of every pretraining (default: the study's, step: /10 at 50%% and 75%%; cosine anneals "
                             "to 0, and with the gate's 0.5 the rule is checked in the second half); results in "
                             "docs/results/study-cosine/ unless --results_dir")
    parser.add_argument("--datasets", default="", help="comma-separated subset of the study's data sets")
    parser.add_argument("--seeds", default="", help="comma-separated subset of the seeds")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="fixed, stop or both")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of " + ", ".join(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="pipelines run side by side (processes); 2 on 2 cores")
    parser.add_argument("--output_dir", default="", help="run directories (default runs/study, runs/study-smoke)")
    parser.add_argument("--results_dir", default="", help="study.json/.md and plots (default docs/results, "
                        "<output_dir>/results with --smoke)")
    parser.add_argument("--data_root", default=os.path.join(ROOT, "data"), help="holds FashionMNIST/raw/")
    parser.add_argument("--report_only", action="store_true",
                        help="write the outputs from finished runs; train nothing")
    parser.add_argument("--plan", action="store_true", help="list the pipeline calls and their run directories")
    parser.add_argument("--echo", action="store_true", help="also print the pipelines' lines (jobs=1)")
    parser.add_argument("--wandb", action="store_true", help="log every run to W&B (offline unless WANDB_MODE "
                        "says otherwise), one group per cell (data set x budget); docs/wandb.md")
    parser.add_argument("--wandb_project", default="loft_ext-study", help="the W&B project with --wandb")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline" if args.wandb else "disabled")
    if args.smoke and args.quick:
        print("error: --smoke and --quick exclude each other; pass one", file=sys.stderr)
        return 2
    if args.distance_lr_below is not None and not 0 < args.distance_lr_below <= 1:
        print(f"error: --distance_lr_below must be in (0, 1], a fraction of the peak lr (got {args.distance_lr_below})",
              file=sys.stderr)
        return 2
    spec = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.model:
        spec = dataclasses.replace(spec, model=args.model)
    if args.preset:
        spec = dataclasses.replace(spec, preset=args.preset)
    if args.optimizer_state:
        spec = dataclasses.replace(spec, optimizer_state=args.optimizer_state)
    if args.detector_windows == "records":
        spec = dataclasses.replace(spec, distance_window_epochs=0.0, earlybird_every=-1, distance_lr_below=1.0)
    if args.distance_lr_below is not None:
        spec = dataclasses.replace(spec, distance_lr_below=args.distance_lr_below)
    if args.lr_schedule:
        spec = dataclasses.replace(spec, lr_schedule=args.lr_schedule)
    if args.wandb:
        spec = dataclasses.replace(spec, wandb_project=args.wandb_project)
    output_dir = os.path.abspath(args.output_dir or
                                 os.path.join(ROOT, "runs", "study-smoke" if args.smoke else "study"))
    variant = results_variant(spec, args.detector_windows)
    results_dir = os.path.abspath(
        args.results_dir or (os.path.join(output_dir, "results") if args.smoke
                             else os.path.join(output_dir, "results-quick") if args.quick
                             else os.path.join(ROOT, "docs", "results", f"study-{variant}") if variant
                             else os.path.join(ROOT, "docs", "results")))
    data_root = os.path.abspath(args.data_root)
    names = [d.name for d in spec.datasets]
    datasets = args.datasets.split(",") if args.datasets else names
    seeds = parse_seeds(args.seeds) if args.seeds else spec.seeds
    budgets = tuple(b for b in args.budgets.split(",") if b)
    methods = tuple(m for m in args.methods.split(",") if m)
    for kind, given, allowed in (("data set", datasets, names), ("budget", budgets, BUDGETS),
                                 ("method", methods, METHODS), ("seed", seeds, spec.seeds)):
        bad = [x for x in given if x not in allowed]
        if bad:
            print(f"error: unknown {kind} {', '.join(map(str, bad))}; choose from {', '.join(map(str, allowed))}",
                  file=sys.stderr)
            return 2
    tasks = make_tasks(spec, datasets, budgets, methods, seeds)
    os.chdir(ROOT)
    if args.plan:
        for task in tasks:
            pre, _ = hparams_of(spec, task, output_dir, data_root)
            done = os.path.isfile(os.path.join(run_dir_of(pre, output_dir), "summary.json"))
            print(f"{task.key:<40} tickets {','.join(task.ticket_methods):<16} "
                  f"{os.path.relpath(run_dir_of(pre, output_dir), ROOT)}{'  (pretrained)' if done else ''}")
        return 0
    t0 = time.time()
    if not args.report_only:
        prepare_data(spec, datasets, data_root)
        print(f"study: {len(tasks)} pretrainings (+ tickets) -> {os.path.relpath(output_dir, ROOT)}; "
              f"finished stages are skipped", flush=True)
        try:
            run_tasks(spec, tasks, output_dir, data_root, args.jobs, args.echo)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to continue (finished pretrainings and tickets are "
                  "skipped; an interrupted pretraining continues from the checkpoint it wrote, where the "
                  "pipeline has checkpointing, else starts over; an interrupted fine-tuning starts over)",
                  file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    all_tasks = make_tasks(spec, names, BUDGETS, METHODS, spec.seeds)  # the report covers the whole study
    result = write_outputs(spec, all_tasks, output_dir, data_root, results_dir, args.smoke,
                           sys.argv[1:] if argv is None else argv)
    print_summary(result)
    print(f"wrote {os.path.relpath(results_dir, ROOT)}/study.json, study.md, study_accuracy_vs_ratio.png, "
          f"study_distance_curves.png ({len(result['runs'])} of {len(all_tasks)} pretrainings finished; "
          f"{time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
