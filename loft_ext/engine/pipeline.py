"""The one-command pipeline: pretrain -> draw tickets at one or several ratios -> fine-tune -> evaluate.

Stages live in the pretraining run's directory and are resumable: a finished pretraining is reused,
and a ticket whose ``result.json`` exists is read back instead of being trained again. Every rank
runs every stage (tickets are drawn from the same saved weights, so identically everywhere);
only the main process writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from ..budget import row_budget
from ..checkpoint import file_lock, write_json_atomic
from ..data import data_health, load_dataset
from ..hparams import Hparams, field, hparams_hash
from ..models import create_model
from ..partition.plan import make_plan
from ..report import format_table
from ..tickets.deploy import EXPORTS, check_export, save_deployable
from ..tickets.export import compact_model, load_compact, save_compact
from ..tickets.finetune import OPTIMIZERS, finetune
from ..tickets.masks import save_masks
from ..tickets.plugins import draw_ticket
from ..tickets.prune import SCOPES, PruneError, sparsity_report
from ..ticket_runs import log_ticket_runs
from ..tracking import RunLogger
from ..errors import ConfigError
from ..plugins.snapshots import save_weights
from .config import PRETRAIN_HPARAMS, CheckpointHparams, DeepSpeedHparams, validate, validate_checkpointing
from .pretrain import run_pretrain
from .setup import fsdp_from_launcher, start_accelerator, start_tracker, tracker_mode


@dataclass
class TicketHparams(Hparams):
    """Tickets and fine-tuning"""

    ratios: tuple[float, ...] = field((0.5,), "pruning ratios r (fraction removed), one ticket per ratio; "
                                      "empty ('') = pretraining only")
    ticket: str = field("structured", "structured: whole channel units of the split groups, exported as a "
                        "smaller model; unstructured: global magnitude of conv/linear weights",
                        ("structured", "unstructured"))
    prune_scope: str = field("per-group", "structured: the ratio applies to every block-hidden group (per-group) "
                             "or to all their units together after per-group normalisation (global); "
                             "hidden+stream also prunes the residual-stream channels (coupled over every block "
                             "adding into the stream, downsample convs, norms, head) by a group score, per group",
                             SCOPES)
    prune_score: str = field("auto", "unit score: l2 (producer filter norm), bn (|gamma|), random; auto = bn "
                             "for --method earlybird, random for --method random, else l2",
                             ("auto", "l2", "bn", "random"))
    min_keep: int = field(1, "structured: every group keeps at least this many units")
    prune_levels: int = field(1, "unstructured: levels of pruning-and-retraining; each removes r of the survivors")
    rewind: str = field("none", "weights the ticket starts fine-tuning from: none (the pruned pretrained "
                        "weights), init (the initial weights) or round (the weights after --rewind_round)",
                        ("none", "init", "round"))
    rewind_round: int = field(0, "with --rewind round: the pretraining round whose weights are saved and used")
    finetune_epochs: int = field(2, "fine-tuning epochs per ticket; 0 = evaluate each ticket as pruned, "
                                 "untrained (its one-shot accuracy)")
    oneshot_bn_batches: int = field(8, "with --finetune_epochs 0: training batches (of --finetune_batch_size) "
                                    "that re-estimate the ticket's BatchNorm statistics before its one-shot "
                                    "evaluation (removing channels shifts them); 0 = the pretrained statistics")
    finetune_lr: float = field(0.01, "fine-tuning learning rate (cosine annealed)")
    finetune_optimizer: str = field("sgd", "fine-tuning optimizer (sgd: momentum and weight decay of the "
                                    "training flags; adamw)", OPTIMIZERS)
    finetune_batch_size: int = field(64, "fine-tuning batch size per process")
    export: str = field("none", "dependency-free export of each ticket under <ticket>/deploy: pt2 (a torch.export "
                        "program, loads with torch.export.load and no loft_ext), pt2+onnx (also ONNX, checked with "
                        "onnxruntime; needs the onnx extra), none", EXPORTS)


ALL_HPARAMS = PRETRAIN_HPARAMS + (TicketHparams, DeepSpeedHparams, CheckpointHparams)


def validate_tickets(t: TicketHparams) -> None:
    checks = [
        (all(0 <= r < 1 for r in t.ratios), f"--ratios must lie in [0, 1), got {t.ratios}"),
        (t.min_keep >= 1, f"--min_keep must be >= 1 (got {t.min_keep})"),
        (t.prune_levels >= 1, f"--prune_levels must be >= 1 (got {t.prune_levels})"),
        (t.rewind != "round" or t.rewind_round >= 1, "--rewind round needs --rewind_round >= 1"),
        (t.finetune_epochs >= 0, f"--finetune_epochs must be >= 0 (got {t.finetune_epochs})"),
        (t.oneshot_bn_batches >= 0, f"--oneshot_bn_batches must be >= 0 (got {t.oneshot_bn_batches})"),
        (t.finetune_lr > 0, f"--finetune_lr must be > 0 (got {t.finetune_lr})"),
        (t.finetune_batch_size >= 1, f"--finetune_batch_size must be >= 1 (got {t.finetune_batch_size})"),
        (t.ticket == "unstructured" or t.prune_levels == 1, "--prune_levels > 1 is for --ticket unstructured"),
        (t.ticket == "structured" or t.prune_scope != "hidden+stream",
         "--prune_scope hidden+stream is for --ticket structured"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_export(t.export)


def _score(method: str, requested: str) -> str:
    if requested != "auto":
        return requested
    return {"earlybird": "bn", "random": "random"}.get(method, "l2")


def _forward_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape, device=next(model.parameters()).device))
    return int(counter.get_total_flops())


def _latency_ms(model: torch.nn.Module, shape: tuple[int, ...], repeats: int = 10) -> float:
    model.eval()
    x = torch.zeros(shape, device=next(model.parameters()).device)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _load(model: torch.nn.Module, path: str) -> torch.nn.Module:
    model.load_state_dict(load_file(path), strict=True)
    return model


def run_pipeline(model_hp, data_hp, loft_hp, train_hp, det_hp, out_hp, ticket_hp: TicketHparams,
                 ds_hp: DeepSpeedHparams | None = None, ckpt_hp: CheckpointHparams | None = None,
                 print_fn=print) -> dict:
    """Pretrain, then one ticket per ratio: prune, fine-tune with masks enforced, evaluate, export."""
    validate_tickets(ticket_hp)
    ckpt_hp = ckpt_hp or CheckpointHparams()
    validate_checkpointing(ckpt_hp)
    wandb_mode = tracker_mode(out_hp)
    out_hp = fsdp_from_launcher(out_hp)
    accelerator = start_accelerator(out_hp, wandb=wandb_mode != "disabled",
                                    collective_timeout=ckpt_hp.collective_timeout)
    main = accelerator.is_main_process
    say = print_fn if main else (lambda *a, **k: None)
    validate(model_hp, data_hp, loft_hp, train_hp, det_hp)  # cheap checks before the data set is read
    data = load_dataset(data_hp.dataset, data_hp.data_dir, data_hp.image_size or None, data_hp.augment,
                        data_hp.bad_images)
    if ticket_hp.ratios and len(data.train) < ticket_hp.finetune_batch_size:  # not only after pretraining
        raise ConfigError(f"the training set has {len(data.train)} samples, fewer than one fine-tuning batch of "
                          f"--finetune_batch_size {ticket_hp.finetune_batch_size}; lower it (or pass "
                          "--ratios '' to skip the tickets)")
    pre = run_pretrain(model_hp, data_hp, loft_hp, train_hp, det_hp, out_hp, print_fn, accelerator=accelerator,
                       rewind_round=ticket_hp.rewind_round if ticket_hp.rewind == "round" else 0, ds_hp=ds_hp,
                       ckpt_hp=ckpt_hp, data=data)
    run_dir = pre["run_dir"]
    if not ticket_hp.ratios:
        return pre
    start = {"none": None, "init": "init.safetensors",
             "round": f"round_{ticket_hp.rewind_round}.safetensors"}[ticket_hp.rewind]
    if start is not None and not os.path.exists(os.path.join(run_dir, start)):
        # round weights are saved only by a pretraining that knew --rewind_round before it trained
        raise ConfigError(f"--rewind {ticket_hp.rewind}: {os.path.join(run_dir, start)} is missing; the pretraining "
                          "finished without saving those weights. Pass --force to pretrain again with "
                          f"--rewind_round {ticket_hp.rewind_round}, or use another --output_dir")
    shape = (1, data.in_chans, data.image_size, data.image_size)
    score = _score(loft_hp.method, ticket_hp.prune_score)
    world = accelerator.num_processes
    fired = {t["detector"]: t["round"] for t in pre.get("tickets", [])}
    epochs_per_round = pre.get("epochs_done", 0) / pre["rounds_done"] if pre.get("rounds_done") else None
    rows = []
    group = f"{model_hp.model}-{data.name}"
    if wandb_mode != "disabled":
        start_tracker(accelerator, out_hp, wandb_mode, {"TicketHparams": ticket_hp.to_dict()},
                      group, "finetune", os.path.basename(run_dir) + "-tickets", run_dir)
    logger = RunLogger(run_dir if main else None, accelerator, wandb=wandb_mode != "disabled")
    steps = [pre.get("rounds_done", 0)]
    for ratio in ticket_hp.ratios:
        tid = hparams_hash(dataclasses.replace(ticket_hp, ratios=(ratio,), export="none"))  # export: no new ticket
        tdir = os.path.join(run_dir, "tickets", f"{ticket_hp.ticket}-{score}-r{ratio:g}-{tid}")
        result_path = os.path.join(tdir, "result.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                rows.append(json.load(f))
            say(f"ticket r={ratio:g} already fine-tuned: {tdir}")
            if main and ticket_hp.export != "none" and ticket_hp.ticket == "structured":
                deploy = os.path.join(tdir, "deploy")
                if not os.path.exists(os.path.join(deploy, "deploy.json")) or ticket_hp.export == "pt2+onnx" \
                        and not os.path.exists(os.path.join(deploy, "ticket.onnx")):
                    rows[-1]["export"] = save_deployable(deploy, load_compact(os.path.join(tdir, "compact")), shape,
                                                         ticket_hp.export, train_hp.seed)["max_abs_diff"]
                    write_json_atomic(result_path, rows[-1])
            continue
        t0 = time.time()
        model = _load(create_model(model_hp.model, data.num_classes, data.in_chans),
                      os.path.join(run_dir, "model.safetensors"))
        plan = make_plan(model, 1, model_hp.preset, shape, model_hp.model)
        try:
            drawn = draw_ticket(model, ratio, ticket_hp.ticket, score, plan=plan, scope=ticket_hp.prune_scope,
                                min_keep=ticket_hp.min_keep, levels=ticket_hp.prune_levels, seed=train_hp.seed)
            masks, meta, ticket = drawn.masks, drawn.meta, drawn.structured
        except PruneError as exc:
            raise ConfigError(str(exc)) from None
        t_prune = time.time() - t0
        if start is not None:
            _load(model, os.path.join(run_dir, start))
        report = sparsity_report(model, masks)
        if main:
            save_masks(tdir, masks, {**meta, "rewind": ticket_hp.rewind, "sparsity": report})
        say(f"ticket r={ratio:g} ({ticket_hp.ticket}, {score}): keeps {report['params_kept'] / 1e6:.3f}M of "
            f"{report['params_total'] / 1e6:.3f}M parameters; fine-tuning {ticket_hp.finetune_epochs} epochs",
            flush=True)
        def log(m, ratio=ratio):
            what = f"fine-tune epoch {m['epoch']}" if m["epoch"] else "one-shot (not fine-tuned)"
            say(f"  ticket r={ratio:g} {what}: test acc {100 * m['test_acc']:.2f}%", flush=True)
            steps[0] += 1  # one W&B step per fine-tuning epoch, increasing across tickets
            logger.log({f"ticket_r{ratio:g}/{k}": v for k, v in m.items()}, step=steps[0], kind="ticket")

        result = finetune(model, masks, data.train, data.test, accelerator, epochs=ticket_hp.finetune_epochs,
                          lr=ticket_hp.finetune_lr, batch_size=ticket_hp.finetune_batch_size,
                          optimizer=ticket_hp.finetune_optimizer, momentum=train_hp.momentum,
                          weight_decay=train_hp.weight_decay, seed=train_hp.seed,
                          eval_batch_size=data_hp.eval_batch_size, log=log,
                          oneshot_bn_batches=ticket_hp.oneshot_bn_batches,
                          memory_format=torch.channels_last if out_hp.channels_last else torch.contiguous_format)
        model.cpu()
        dense_flops = _forward_flops(model, shape)
        row = {
            "method": loft_hp.method, "model": model_hp.model, "S": pre.get("workers"), "L": pre.get("local_steps"),
            "D": pre.get("replicas"), "optimizer_state": pre.get("optimizer_state"), "rounds": pre.get("rounds_done"), "epochs": round(pre.get("epochs_done", 0), 2),
            "detector": ",".join(sorted(fired)) or None, "detector_round": min(fired.values()) if fired else None,
            "detector_epoch": min(fired.values()) * epochs_per_round if fired and epochs_per_round else None,
            "ticket": ticket_hp.ticket, "score": score, "ratio": ratio,
            "scope": ticket_hp.prune_scope if ticket_hp.ticket == "structured" else None,
            "params": report["params_total"], "kept_params": report["params_kept"],
            "flops": dense_flops, "kept_flops": dense_flops,
            "test_acc": result["test_acc"], "pretrain_test_acc": pre.get("test_acc"),
            # known only for a ticket evaluated as pruned (no fine-tuning): then it is its test accuracy
            "oneshot_test_acc": result["test_acc"] if ticket_hp.finetune_epochs == 0 else None,
            **row_budget(pre),  # pretrain_bytes: every phase that moved bytes (loft_ext/budget.py)
            # fine-tuning is DDP: a ring all-reduce of every gradient per step moves 2 (W-1)/W of them
            "finetune_bytes": 2 * (world - 1) / world * 4 * report["params_total"] * result["steps"],
            "pretrain_wall_s": pre.get("wall_s"), "prune_wall_s": t_prune, "finetune_wall_s": result["wall_s"],
            "dir": tdir,
        }
        if ticket_hp.ticket == "structured":
            small = compact_model(model, ticket)
            row.update(kept_params=sum(p.numel() for p in small.parameters()),
                       kept_flops=_forward_flops(small, shape), latency_ms=_latency_ms(small, shape),
                       dense_latency_ms=_latency_ms(model, shape))
            row.update(flop_ratio=dense_flops / max(row["kept_flops"], 1),
                       speedup=row["dense_latency_ms"] / max(row["latency_ms"], 1e-9))
            if main:
                save_compact(os.path.join(tdir, "compact"), small, model_hp.model, data.num_classes, data.in_chans)
                if ticket_hp.export != "none":
                    row["export"] = save_deployable(os.path.join(tdir, "deploy"), small, shape, ticket_hp.export,
                                                    train_hp.seed)["max_abs_diff"]
        row["total_bytes"] = row["pretrain_bytes"] + row["finetune_bytes"]
        if main:
            save_weights(model, os.path.join(tdir, "finetuned.safetensors"))
            write_json_atomic(result_path, row)  # its presence marks the ticket finished
        rows.append(row)
        if dist.is_initialized():
            dist.barrier()
    columns = ["method", "model", "S", "L", "D", "rounds", "epochs", "detector", "detector_round", "ticket",
               "score", "scope", "ratio", "params", "kept_params", "flops", "kept_flops", "flop_ratio", "speedup",
               "test_acc", "pretrain_bytes", "total_bytes", "samples_per_worker", "samples_total", "pretrain_wall_s",
               "finetune_wall_s"]
    logger.log_table("tickets", columns, [[r.get(c) for c in columns] for r in rows], step=steps[0] + 1)
    if main and wandb_mode != "disabled":  # one W&B run per ticket, while the fine-tuning run is still open
        log_ticket_runs(accelerator.get_tracker("wandb", unwrap=True), rows, project=out_hp.wandb_project,
                        group=out_hp.wandb_group or group, mode=wandb_mode, run_dir=run_dir, dataset=data.name,
                        seed=train_hp.seed, rewind=ticket_hp.rewind, finetune_epochs=ticket_hp.finetune_epochs,
                        oneshot_bn_batches=ticket_hp.oneshot_bn_batches if ticket_hp.finetune_epochs == 0 else None)
    logger.close()
    if main:
        summary_path = os.path.join(run_dir, "summary.json")
        with file_lock(summary_path + ".lock"):  # pipelines drawing other tickets may merge at the same time
            with open(summary_path) as f:
                summary = json.load(f)
            merged = {r["dir"]: r for r in summary.get("ticket_rows", [])}  # tickets of earlier calls stay
            merged.update({r["dir"]: r for r in rows})
            summary["ticket_rows"] = list(merged.values())
            if not pre.get("skipped"):  # unreadable images of pretraining and fine-tuning
                summary.update(data_health(data))
            write_json_atomic(summary_path, summary)
    say("\n" + format_table(rows))
    return {**pre, "ticket_rows": rows}
