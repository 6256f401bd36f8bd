"""LoFT (or dense) pretraining from the recipe's hparams, stored under a directory named by their hash.

Accelerate owns process start, device placement and autocast; the :class:`loft_ext.LoFT` helper builds
the S x D grid over the processes Accelerate started (world size 1: all S workers simulated in this
process) and the recipe's loop (:func:`loft_ext.engine.loop.fit`) drives it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..budget import pretrain_budget
from ..checkpoint import CheckpointError, CheckpointStore, write_json_atomic
from ..data import BatchStream, DataBundle, data_health, load_dataset
from ..errors import ConfigError, Preempted, TrainingFailure
from ..hparams import hparams_hash
from ..models import create_model
from ..parallel import analytic, ds
from ..parallel.shard_sync import ShardedAllGatherSync, ShardedAllToAllSync
from ..parallel.ds import DeepSpeedConfigError, LoftMPU
from ..parallel.grid import GridError, build_grid, check_world, plan_layout
from ..parallel.replicas import check_replicas
from ..parallel.sync import AllGatherSync
from ..partition.plan import make_plan
from ..plugins.base import Plugin
from ..plugins.registry import create_plugin
from ..plugins.snapshots import save_weights
from ..ticket_runs import log_model_artifact
from ..tracking import RunLogger, wandb_run_id
from . import checkpointing
from .checkpointing import CHECKPOINT_DIR, Checkpointer
from .config import (CheckpointHparams, DataHparams, DeepSpeedHparams, DetectorHparams, LoftHparams, ModelHparams,
                     OutputHparams, TrainHparams, validate, validate_checkpointing)
from .debug import DebugHashes
from .helper import LoFT, LoFTConfig
from .loop import fit, local_step, lr_at
from .setup import (check_stored_plan, deepspeed_from_launcher, fsdp_from_launcher, lock_run, prepare_run_dir,
                    releases_run_locks, start_accelerator, start_tracker, tracker_mode, truncate_logs)


def build_plugins(det_hp: DetectorHparams, out_hp: OutputHparams, main: bool, print_fn, run_dir: str,
                  rank: int) -> list[Plugin]:
    """The run's plugins from its flags, by registry name, in the order they see each event (recorders
    before the rules that read them; extra ``--plugins`` after the built-ins)."""
    plugins: list[Plugin] = [create_plugin("progress", print_fn=print_fn)] if main else []
    if det_hp.distance_layers != "none":
        recorder = create_plugin("filter_distance", layers=det_hp.distance_layers, every=det_hp.distance_every)
        plugins += [recorder, create_plugin("distance_stop", recorder=recorder, window=det_hp.distance_window,
                                            eps=det_hp.distance_eps, stop=det_hp.distance_stop,
                                            window_epochs=det_hp.distance_window_epochs,
                                            lr_below=det_hp.distance_lr_below)]
    if det_hp.earlybird:
        plugins.append(create_plugin("earlybird", ratio=det_hp.earlybird_ratio, every=det_hp.earlybird_every,
                                     stop=det_hp.earlybird_stop))
    if out_hp.debug_hashes:
        plugins.append(DebugHashes(os.path.join(run_dir, f"hashes-rank{rank}.jsonl")))
    plugins += [create_plugin(name.strip()) for name in det_hp.plugins.split(",") if name.strip()]
    return plugins


def fsdp_report(engine, rounds: int, steps: int) -> dict:
    """Analytic bytes of FSDP's own collectives on this rank (they bypass ``Comm``, so nothing measures
    them; the DDP phase ``dp_grad`` is absent under fsdp)."""
    from ..parallel.sharded import keeps_fp32, shard_units

    w = engine.workers[0]
    elem = next(w.model.parameters()).element_size()
    gather_elem = 2 if w.sharded.mixed_precision == "bf16" else elem  # the bf16 policy all-gathers bf16
    sub = w.sharded.module  # its DTensors have the sub-network's global shapes (the plain copy is released)
    fp32_groups = [m for m in sub.modules() if keeps_fp32(m)] if w.sharded.mixed_precision != "no" else []
    per = analytic.fsdp_step_bytes(sub, shard_units(sub), engine.grid.replicas, gather_elem, elem, fp32_groups,
                                   state_copies=1 if engine.optimizer_state == "carry" else 0)
    if isinstance(engine.strategy, ShardedAllGatherSync):  # the sync moves shards: no full_tensor() gather
        per["round_bytes_sent"] = 0.0
    return {"note": "analytic only: FSDP's all-gathers and reduce-scatters do not go through loft_ext's Comm",
            **per, "bytes_sent": per["step_bytes_sent"] * steps + per["round_bytes_sent"] * rounds}


def communication_report(engine, model, rounds: int, steps: int, elem: int) -> dict:
    """Measured bytes per phase next to the analytic count for the same run, strategy and grid layout
    (both split into intra-node and inter-node bytes). Under ``--replicas fsdp`` the analytic ``dp_grad``
    (DDP's all-reduce) is replaced by ``fsdp_analytic`` (FSDP's collectives, analytic only)."""
    grid, plan = engine.grid, engine.plan
    copies = 1 if engine.optimizer_state == "carry" else 0  # SGD momentum: one state tensor per param
    strategy = "allgather" if isinstance(engine.strategy, AllGatherSync) else "alltoall"
    layout = grid.layout or plan_layout([0] * grid.world_size, grid.workers)
    counted = analytic.rank_bytes(model, plan, layout, grid.rank, strategy, rounds, steps, elem, copies,
                                  draw=engine.draw,
                                  sharded=isinstance(engine.strategy, (ShardedAllGatherSync, ShardedAllToAllSync)))
    fsdp = {}
    if engine.workers[0].sharded is not None:
        counted.pop("dp_grad", None)
        fsdp = {"fsdp_analytic": fsdp_report(engine, rounds, steps)}
    return {
        **fsdp, "rank": grid.rank, "worker": grid.filter_index, "replica": grid.data_index, "workers": grid.workers,
        "replicas": grid.replicas, "strategy": engine.strategy.__class__.__name__, "rounds": rounds,
        "node": layout.nodes[grid.rank], "nodes": layout.nodes, "grid_order": layout.order,
        "measured": engine.comm.totals(), "analytic": counted,
    }


# what torch.distributed's backends say when a peer is gone or late (gloo raises plain RuntimeErrors)
_COMMUNICATION_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe",
                        "closed", "reset by", "process group")


def communication_failed(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or any(w in str(exc).lower() for w in _COMMUNICATION_WORDS)


def drop_finished_checkpoints(run_dir: str, ckpt_hp: CheckpointHparams) -> None:
    """With ``--finished_run_checkpoints delete``, a finished run's resume checkpoints go (its model,
    logs and summary stay): a sweep of hundreds of runs need not keep two full states of each."""
    if ckpt_hp.finished_run_checkpoints == "delete":
        shutil.rmtree(os.path.join(run_dir, CHECKPOINT_DIR), ignore_errors=True)


@releases_run_locks
def run_pretrain(model_hp: ModelHparams, data_hp: DataHparams, loft_hp: LoftHparams,
                 train_hp: TrainHparams, det_hp: DetectorHparams, out_hp: OutputHparams,
                 print_fn=print, accelerator=None, rewind_round: int = 0,
                 ds_hp: DeepSpeedHparams | None = None, ckpt_hp: CheckpointHparams | None = None,
                 data: DataBundle | None = None) -> dict:
    """LoFT (or dense) pretraining with plugins; returns summary.json's content plus ``run_dir``.
    ``data``: the data set of ``data_hp`` when the caller has loaded it already.

    Saves ``init.safetensors`` (the initial weights), ``model.safetensors`` (the assembled model at the
    end) and, with ``rewind_round`` > 0, ``round_<k>.safetensors`` (the assembled model after round k).
    """
    validate(model_hp, data_hp, loft_hp, train_hp, det_hp)
    ckpt_hp = ckpt_hp or CheckpointHparams()
    validate_checkpointing(ckpt_hp)
    if out_hp.data_workers < 0:
        raise ConfigError(f"--data_workers must be >= 0 (got {out_hp.data_workers})")
    if loft_hp.method == "earlybird":  # dense pretraining that the Early-Bird detector ends
        det_hp = dataclasses.replace(det_hp, earlybird=True, earlybird_stop=True)
    wandb_mode = tracker_mode(out_hp)
    dense = loft_hp.method in ("dense", "earlybird")
    workers = 1 if dense else loft_hp.workers
    optimizer_state = "carry" if dense else loft_hp.optimizer_state
    out_hp = fsdp_from_launcher(out_hp)
    accelerator = accelerator or start_accelerator(out_hp, wandb=wandb_mode != "disabled",
                                                   collective_timeout=ckpt_hp.collective_timeout)
    world, main = accelerator.num_processes, accelerator.is_main_process
    try:
        replicas = check_world(world, workers) if world > 1 else 1
    except GridError as exc:
        raise ConfigError(str(exc)) from None
    say = print_fn if main else (lambda *a, **k: None)
    ds_hp = deepspeed_from_launcher(ds_hp)
    ds_cfg = None
    if out_hp.replicas == "fsdp":  # refused before anything is loaded or written
        if ds_hp is not None and ds_hp.deepspeed:
            raise ConfigError("--replicas fsdp and --deepspeed both shard the replicas; choose one (drop "
                              "--replicas fsdp, or --deepspeed and its config)")
        check_replicas(out_hp.replicas)
    if ds_hp is not None and ds_hp.deepspeed:
        try:  # the config is checked first, so its mistakes are reported even in a single process
            ds_cfg = ds.load_ds_config(ds_hp.deepspeed_config, data_hp.batch_size, replicas if world > 1 else None)
        except DeepSpeedConfigError as exc:
            raise ConfigError(str(exc)) from None
        if out_hp.channels_last:  # DeepSpeed broadcasts each parameter as a byte view (needs stride(-1) == 1)
            raise ConfigError("--channels_last does not work with --deepspeed: DeepSpeed views every parameter "
                              "as bytes to broadcast it, which needs the default layout; drop --channels_last")
        if world == 1:
            raise ConfigError("--deepspeed needs one process per worker: launch with "
                              f"`deepspeed --num_gpus {workers} recipes/loft_timm.py --deepspeed ...`")
        if ds.zero_stage(ds_cfg) == 3 and ds_hp.ds_clip == "separate" and float(ds_cfg["gradient_clipping"]) > 0:
            raise ConfigError("--ds_clip separate clips each worker's gradients between backward and step, which "
                              "ZeRO-3 keeps partitioned; use --ds_clip joint (DeepSpeed clips) or gradient_clipping 0")
        data_hp = dataclasses.replace(data_hp, batch_size=ds_cfg["train_micro_batch_size_per_gpu"])
    data = data or load_dataset(data_hp.dataset, data_hp.data_dir, data_hp.image_size or None, data_hp.augment,
                                data_hp.bad_images)
    # everything that can refuse the run happens before the run directory is touched
    torch.manual_seed(train_hp.seed)
    model = create_model(model_hp.model, data.num_classes, data.in_chans)
    input_shape = (1, data.in_chans, data.image_size, data.image_size)
    plan = make_plan(model, workers, model_hp.preset, input_shape, model_hp.model)
    if det_hp.earlybird and not any(isinstance(m, torch.nn.BatchNorm2d) and m.affine for m in model.modules()):
        if det_hp.earlybird_stop:  # --method earlybird or --earlybird_stop: the detector is the point
            raise ConfigError(f"Early-Bird ranks BatchNorm2d scales and {model_hp.model} has none; choose a model "
                              "with BatchNorm (e.g. resnet18) or another --method / drop --earlybird_stop")
        say(f"note: {model_hp.model} has no BatchNorm2d, so the Early-Bird detector is off for this run")
        det_hp = dataclasses.replace(det_hp, earlybird=False)
    hashed = (model_hp, data_hp, loft_hp, train_hp, det_hp)
    # S simulated workers and S processes give the same run; D replicas change the batch, so D is named
    run_id = hparams_hash(*hashed)
    if ds_cfg is not None:  # clipping or precision in the config can change the result
        run_id = hashlib.sha256(f"{run_id}-{json.dumps(ds_cfg, sort_keys=True)}-{ds_hp.ds_clip}".encode()
                                ).hexdigest()[:12]
    if replicas > 1:
        run_id = hashlib.sha256(f"{run_id}-replicas{replicas}".encode()).hexdigest()[:12]
    name = f"{model_hp.model}-{run_id}"
    run_dir = os.path.join(out_hp.output_dir, name)
    config = {type(h).__name__: h.to_dict() for h in hashed}
    identity = {"run": name, "model": model_hp.model, "dataset": data_hp.dataset, "method": loft_hp.method,
                "workers": workers, "replicas": replicas, "world": world, "preset": model_hp.preset,
                "sync": loft_hp.sync, "optimizer_state": optimizer_state, "deepspeed": ds_cfg is not None,
                "hparams": json.loads(json.dumps(config, default=list))}
    if main:  # before anything in the run directory is read, moved or written
        lock_run(out_hp.output_dir, name)
    check_stored_plan(run_dir, plan, out_hp.force, ckpt_hp.resume)
    resume_from, start_round = None, 0
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        try:  # checked before the run directory is touched
            resume_from = checkpointing.find_checkpoint(ckpt_hp.resume, run_dir)
            if resume_from is not None:
                checkpointing.check_identity(resume_from, identity)
                start_round = checkpointing.load_model(resume_from, model)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    if main:
        prepare_run_dir(out_hp.output_dir, name, out_hp.force, ckpt_hp.resume)
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            truncate_logs(run_dir, start_round)  # a fresh start drops an earlier attempt's lines
    grid = build_grid(workers, out_hp.grid_order, ckpt_hp.collective_timeout) if world > 1 else None
    if grid is not None:
        dist.barrier()  # the main process has prepared (or moved) the run directory
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        say(f"pretraining {run_dir} already finished (test acc {100 * summary['test_acc']:.2f}%); "
            "pass --force to train it again")
        if main:
            drop_finished_checkpoints(run_dir, ckpt_hp)
        return {**summary, "run_dir": run_dir, "skipped": True}
    if main and resume_from is None:
        save_weights(model, os.path.join(run_dir, "init.safetensors"))

    t_start = time.time()
    device = accelerator.device
    memory_format = torch.channels_last if out_hp.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)  # sub-networks keep each tensor's layout (narrow_model)
    full_params = sum(p.numel() for p in model.parameters())  # before alltoall frees the split tensors
    fractions = " ".join(f"{plan.worker_numel(model, s) / full_params:.3f}" for s in range(plan.workers))
    elem = next(model.parameters()).element_size()

    loft = LoFT(accelerator, model, LoFTConfig(workers, loft_hp.local_steps, model_hp.preset, loft_hp.sync,
                                               optimizer_state, train_hp.seed, out_hp.replicas),
                plan=plan, start_round=start_round, replicas_ddp=ds_cfg is None, grid_factory=lambda _: grid)
    engine = loft.engine
    optimizers = [torch.optim.SGD(w.module.parameters(), lr=train_hp.lr, momentum=train_hp.momentum,
                                  weight_decay=train_hp.weight_decay) for w in engine.workers]
    loft.attach(*optimizers, begin=False)
    clip_norm = 0.0
    for w in engine.workers:
        if ds_cfg is not None:  # DeepSpeed all-reduces gradients over the mpu's data group
            clip_norm = ds.wrap_worker(w, lambda ps: torch.optim.SGD(ps, lr=train_hp.lr, momentum=train_hp.momentum,
                                                                      weight_decay=train_hp.weight_decay),
                                       ds_cfg, LoftMPU(grid), ds_hp.ds_clip, carry=optimizer_state == "carry")
    step_fn = functools.partial(local_step, autocast=accelerator.autocast, memory_format=memory_format,
                                clip_norm=clip_norm)
    d_index = grid.data_index if grid else 0
    streams = {w.index: BatchStream(data.train, data_hp.batch_size, w.index, workers,
                                    data_hp.data_order, train_hp.seed, num_workers=out_hp.data_workers,
                                    replica=d_index, replicas=replicas, device=device,
                                    augmented=data.augmented) for w in engine.workers}
    steps_per_epoch = next(iter(streams.values())).steps_per_epoch
    rounds_per_epoch = max(1, math.ceil(steps_per_epoch / loft_hp.local_steps))
    rounds = train_hp.rounds or train_hp.epochs * rounds_per_epoch
    test_loader = DataLoader(data.test, batch_size=data_hp.eval_batch_size)
    recal_loader = DataLoader(data.train, batch_size=data_hp.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(train_hp.seed))

    where = (f"{world} processes = S={workers} x D={replicas} ({loft_hp.sync}, "
             f"{dist.get_backend()}{', DeepSpeed' if ds_cfg else ''}"
             f"{', FSDP replicas' if engine.workers[0].sharded is not None else ''})" if grid else "1 process, workers simulated")
    say(f"{model_hp.model} on {data.name} ({loft_hp.method}): {full_params / 1e6:.2f}M params; "
        f"{len(plan.split)} split groups ({model_hp.preset}); per-worker parameter fraction {fractions}; "
        f"S={workers} L={loft_hp.local_steps} rounds={rounds} ({rounds_per_epoch}/epoch); {where}; "
        f"{'channels_last; ' if out_hp.channels_last else ''}run dir {run_dir}"
        f"{f'; grid on {grid.layout.describe()}' if grid else ''}", flush=True)
    if resume_from is not None:
        say(f"resuming from {resume_from} (after round {start_round} of {rounds})", flush=True)
    elif ckpt_hp.resume:
        say(f"--resume {ckpt_hp.resume}: no complete checkpoint in {run_dir}, starting from round 0", flush=True)
    if main:
        with open(os.path.join(run_dir, "hparams.json"), "w") as f:
            json.dump(config, f, indent=1, default=list)
        with open(os.path.join(run_dir, "plan.json"), "w") as f:
            f.write(plan.to_json())
    wandb = wandb_mode != "disabled"
    if wandb:
        run_id = None
        if main:
            run_id, continued = wandb_run_id(run_dir, resume=resume_from is not None)
            if continued:
                say(f"W&B: continuing run {run_id} (offline segments: `wandb sync {run_dir}/wandb/offline-run-*`)",
                    flush=True)
        start_tracker(accelerator, out_hp, wandb_mode, config, f"{model_hp.model}-{data.name}", "pretrain",
                      name, run_dir, run_id)
    logger = RunLogger(run_dir if main else None, accelerator, wandb=wandb)
    rank = grid.rank if grid else 0
    plugins = build_plugins(det_hp, out_hp, main, print_fn, run_dir, rank)
    if rewind_round > 0:
        plugins.append(create_plugin("save_weights", round_number=rewind_round, main=main,
                                     path=os.path.join(run_dir, f"round_{rewind_round}.safetensors")))
    preemption = create_plugin("preemption", print_fn=say)
    every = rounds_per_epoch if ckpt_hp.checkpoint_every == 0 else max(ckpt_hp.checkpoint_every, 0)
    generators = {"recalibration": recal_loader.generator}
    checkpointer = Checkpointer(CheckpointStore(os.path.join(run_dir, CHECKPOINT_DIR), ckpt_hp.keep_checkpoints),
                                every, identity, streams, generators, rank, main, say)
    # the checkpointer last: it saves the others' state
    plugins += [create_plugin("nonfinite_guard"), preemption, checkpointer]
    loft.plugins.extend(plugins)
    loft.rounds, loft.rounds_per_epoch, loft.logger = rounds, rounds_per_epoch, logger
    lr_fn = functools.partial(lr_at, rounds=rounds, base_lr=train_hp.lr, schedule=train_hp.lr_schedule,
                              milestones=train_hp.lr_milestones, gamma=train_hp.lr_gamma)
    loop = loft
    if resume_from is not None:
        try:
            checkpointing.restore(resume_from, loop, streams, generators, rank)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    try:
        metrics = fit(loft, streams, test_loader, step_fn, lr_fn, recal_loader, train_hp.bn_recalibration_batches)
    except TrainingFailure as exc:
        logger.close()
        raise TrainingFailure(f"{exc}. Last good checkpoint: {checkpointer.store.latest() or 'none'}") from None
    except RuntimeError as exc:  # a collective failed: a peer died, hung past the timeout, or lost its link
        if grid is None or not communication_failed(exc):
            raise  # anything else (a shape or dtype error, a bug) keeps its own traceback
        logger.close()
        latest = checkpointer.store.latest()
        raise TrainingFailure(
            f"rank {rank}: a collective failed in round {loop.state.round_index + 1} "
            f"({str(exc).strip().splitlines()[0][:200]}); another rank probably died or hung longer than "
            f"--collective_timeout {ckpt_hp.collective_timeout:g}s. Last complete checkpoint: {latest or 'none'}; "
            "rerun the same command with --resume latest") from exc
    if loop.preempted:
        logger.close()
        engine.release()
        if grid is not None:
            dist.barrier()
        raise Preempted(preemption.received or signal.SIGTERM, loop.state.round_index, checkpointer.last)
    final = engine.assembled()  # the analytic count below reads the full tensors' sizes
    if grid is not None:
        report = communication_report(engine, model, loop.state.round_index,
                                      loop.state.round_index * loft_hp.local_steps, elem)
        with open(os.path.join(run_dir, f"comm-rank{grid.rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
        m, a = report["measured"].get("sync", {}), report["analytic"]["sync"]

        def inter(counts):
            return sum(counts.get(p, {}).get("inter_node_bytes_sent", 0.0) for p in ("sync", "dp_grad"))
        say(f"communication per rank (rank 0), sync: measured {m.get('bytes_sent', 0) / 2**20:.2f} MiB sent "
            f"in {m.get('calls', 0)} calls, analytic {a['bytes_sent'] / 2**20:.2f} MiB; inter-node (sync + dp_grad) "
            f"measured {inter(report['measured']) / 2**20:.2f} MiB, analytic {inter(report['analytic']) / 2**20:.2f} "
            f"MiB; all phases in {run_dir}/comm-rank*.json", flush=True)
    sync = engine.comm.counters.get("sync")
    summary = {**metrics, "tickets": loop.state.tickets, "stopped_early": bool(loop.stop_reasons),
               "rounds_done": loop.state.round_index, "epochs_done": loop.state.round_index / rounds_per_epoch,
               "workers": workers, "local_steps": loft_hp.local_steps, "replicas": replicas,
               "method": loft_hp.method, "optimizer_state": optimizer_state, "sync_bytes_sent": sync.sent if sync else 0.0,
               **pretrain_budget(engine.comm.totals(), loop.state.round_index, loft_hp.local_steps,
                                 data_hp.batch_size, workers, replicas), **data_health(data),
               "wall_s": time.time() - t_start}
    if main:
        save_weights(final, os.path.join(run_dir, "model.safetensors"))
        write_json_atomic(os.path.join(run_dir, "summary.json"), summary)  # its presence marks the run finished
        if wandb:  # the model as a W&B artifact, which the ticket runs name (loft_ext/ticket_runs.py)
            log_model_artifact(accelerator.get_tracker("wandb", unwrap=True), run_dir, summary)
    engine.release()
    logger.close()
    if grid is not None:
        dist.barrier()  # nobody exits (and tears the group down) while another rank still reads
    if main:  # every rank is past its last checkpoint
        drop_finished_checkpoints(run_dir, ckpt_hp)
    return {**summary, "run_dir": run_dir, "skipped": False}
