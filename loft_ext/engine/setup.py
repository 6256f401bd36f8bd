"""Set-up around a run: the Accelerator, the W&B tracker, DeepSpeed from the launcher, the run directory."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import socket
from datetime import timedelta

import torch

from ..checkpoint import CheckpointStore
from ..errors import ConfigError
from ..parallel import ds
from ..tracking import TrackingError, resolve_wandb_mode
from .checkpointing import CHECKPOINT_DIR
from .config import DeepSpeedHparams, OutputHparams


def start_tracker(accelerator, out_hp: OutputHparams, mode: str, config: dict, default_group: str,
                  job_type: str, name: str, run_dir: str, run_id: str | None = None) -> None:
    """A W&B run through Accelerate (main process only): one group per experiment, one job per stage.
    ``run_id`` names the W&B run (continued if it exists: a resumed pretraining)."""
    accelerator.trackers = []  # a finished stage's tracker must not receive the next stage's logs
    init = {"group": out_hp.wandb_group or default_group, "job_type": job_type, "name": name, "dir": run_dir,
            "mode": mode, "reinit": "finish_previous"}
    if run_id is not None:
        init.update(id=run_id, resume="allow")
    accelerator.init_trackers(out_hp.wandb_project, config=json.loads(json.dumps(config, default=list)),
                              init_kwargs={"wandb": init})


def tracker_mode(out_hp: OutputHparams) -> str:
    """The W&B mode of the run ("disabled" without the tracker); refuses online without credentials."""
    if out_hp.tracker != "wandb":
        return "disabled"
    try:
        mode = resolve_wandb_mode(out_hp.wandb_mode)
    except TrackingError as exc:
        raise ConfigError(str(exc)) from None
    os.environ.setdefault("WANDB_SILENT", "true")  # the run's own lines say where things are
    return mode


def start_accelerator(out_hp: OutputHparams, wandb: bool, collective_timeout: float = 1800.0):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = out_hp.cpu or not torch.cuda.is_available()
    check_mixed_precision(out_hp.mixed_precision, "cpu" if cpu else "cuda")
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=out_hp.mixed_precision,
                                  log_with="wandb" if wandb else None, kwargs_handlers=[timeout])
    except torch.distributed.DistNetworkError as exc:
        if "EADDRINUSE" not in str(exc) and "address already in use" not in str(exc):
            raise
        port = os.environ.get("MASTER_PORT", "?")
        raise ConfigError(
            f"the rendezvous port {port} is already in use (another run or launcher holds it): pick a free "
            "one with `torchrun --master_port N` (or `--standalone`), `accelerate launch --main_process_port N` "
            "or `deepspeed --master_port N`") from None
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"WORLD_SIZE={expected} but Accelerate started {accelerator.num_processes} process(es) with no "
            "common process group; on CPU launch with `torchrun --nproc_per_node N` or "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`")
    ds.release_shm_workspace()  # Accelerate's DeepSpeed plugin starts DeepSpeed's communication here
    return accelerator


def deepspeed_from_launcher(ds_hp: DeepSpeedHparams | None) -> DeepSpeedHparams | None:
    """``accelerate launch --use_deepspeed --deepspeed_config_file F`` turns on the DeepSpeed path with F.

    Accelerate cannot hand DeepSpeed an mpu (it calls ``deepspeed.initialize`` itself in ``prepare``), so
    loft_ext never lets it prepare the model: Accelerate starts the processes and owns the device, and
    loft_ext builds each worker's engine with the LoFT mpu from the same config file."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("true", "1"):
        return ds_hp
    ds_hp = ds_hp or DeepSpeedHparams()
    launched = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not launched:
        raise ConfigError("accelerate launch --use_deepspeed needs --deepspeed_config_file ds_configs/<config>.json: "
                          "loft_ext builds the engines itself (with the LoFT mpu) from an explicit config")
    if ds_hp.deepspeed_config and os.path.abspath(ds_hp.deepspeed_config) != os.path.abspath(launched):
        raise ConfigError(f"--deepspeed_config {ds_hp.deepspeed_config} conflicts with accelerate launch "
                          f"--deepspeed_config_file {launched}; pass one of them")
    return dataclasses.replace(ds_hp, deepspeed=True, deepspeed_config=launched)


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("true", "1", "yes")


def fsdp_from_launcher(out_hp: OutputHparams) -> OutputHparams:
    """``accelerate launch --config_file <an FSDP config>`` (accelerate_configs/fsdp2_*.yaml) turns on
    ``--replicas fsdp``, the run that ``torchrun ... --replicas fsdp`` gives.

    Accelerate shards a whole model over all processes; LoFT shards each worker's sub-network over that
    worker's D ranks (a sub-mesh), which Accelerate's FSDP plugin cannot express. So loft_ext reads the
    launcher's FSDP settings, refuses the ones it does not implement, shards itself, and removes
    ``ACCELERATE_USE_FSDP`` before the Accelerator starts, so the Accelerator never wraps a model (the
    tickets' fine-tuning stays data-parallel, as under torchrun)."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return out_hp
    version = os.environ.get("FSDP_VERSION", "1")
    refused = []
    if version != "2":
        refused.append(f"fsdp_version: {version} (loft_ext shards with FSDP2: set fsdp_version: 2)")
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        refused.append("fsdp_offload_params: true (CPU offload is not built: set it to false)")
    if not _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"):
        refused.append("fsdp_reshard_after_forward: false (not built: set it to true)")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        refused.append("fsdp_activation_checkpointing: true (not built: set it to false)")
    if refused:
        raise ConfigError("the accelerate FSDP config asks for what loft_ext does not do: " + "; ".join(refused)
                          + " (accelerate_configs/fsdp2_cpu.yaml is a working config)")
    launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    precision = out_hp.mixed_precision
    if launched_precision not in ("no", "bf16"):
        raise ConfigError(f"the accelerate config's mixed_precision {launched_precision} is not supported by "
                          "loft_ext: use no or bf16")
    if launched_precision != "no" and precision == "no":
        precision = launched_precision
    elif launched_precision != "no" and precision != launched_precision:
        raise ConfigError(f"--mixed_precision {precision} conflicts with the accelerate config's mixed_precision "
                          f"{launched_precision}; pass one of them")
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    return dataclasses.replace(out_hp, replicas="fsdp", mixed_precision=precision)


def check_mixed_precision(mixed_precision: str, device_type: str, bf16_supported: bool | None = None) -> None:
    """Refuse bf16 on a GPU without bf16 support (pre-Ampere) instead of failing inside a kernel."""
    if mixed_precision != "bf16" or device_type != "cuda":
        return
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if not bf16_supported:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
        raise ConfigError(f"--mixed_precision bf16 needs a GPU with bf16 support (compute capability >= 8.0); "
                          f"{name} has none: use --mixed_precision no")


def prepare_run_dir(output_dir: str, name: str, force: bool, resume: str = "") -> tuple[str, bool]:
    """(run directory, already finished?). Nothing of value is ever overwritten: a finished run, or an
    unfinished one with checkpoints when not resuming, is refused unless ``force``, which renames it to
    <dir>.old-N first."""
    run_dir = os.path.join(output_dir, name)
    done = os.path.exists(os.path.join(run_dir, "summary.json"))
    checkpoints = CheckpointStore(os.path.join(run_dir, CHECKPOINT_DIR)).complete()
    if not done and checkpoints and not resume and not force:
        raise ConfigError(f"{run_dir} holds checkpoints of an unfinished run (up to {checkpoints[-1]}); pass "
                          "--resume latest to continue it, or --force to start over (the old directory is kept, "
                          "renamed)")
    if (done or checkpoints) and force and not resume:
        n = 1
        while os.path.exists(f"{run_dir}.old-{n}"):
            n += 1
        shutil.move(run_dir, f"{run_dir}.old-{n}")
        done = False
    if not done:
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir!r} ({exc.strerror}); "
                              "pass a writable --output_dir") from None
    return run_dir, done


_HELD_RUN_LOCKS: dict[str, tuple[int, list[str]]] = {}  # lock file -> (descriptor holding its flock, dirs made)


def lock_run(output_dir: str, name: str) -> None:
    """Hold ``<output_dir>/.<name>.lock`` (an exclusive flock) while this process trains run ``name``, so a
    second launch of the same hparams into the same output directory (another terminal, a benchmark
    relaunched while the first one's workers still finish their round) is refused instead of training the
    directory twice. It sits beside the run directory, not in it, so ``--force`` renaming the directory cannot
    separate two launches. Re-entrant within one process; released (the file and any directory made for it
    removed) by :func:`releases_run_locks` around the run, and by the OS when the process dies. Where no lock
    can be taken (a read-only directory, a file system without flock) the run goes on unlocked: writing is
    checked, with its own message, by :func:`prepare_run_dir`; a finished run may still be read."""
    path = os.path.join(output_dir, f".{name}.lock")
    if path in _HELD_RUN_LOCKS:
        return
    made, parent = [], os.path.abspath(output_dir)
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    while True:
        try:
            os.makedirs(output_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            _remove_dirs(made)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(f"another process ({holder or 'unknown'}) is training {os.path.join(output_dir, name)} "
                              f"now (it holds {path}): wait for it to end or stop it, then launch again (with "
                              "--resume latest to continue from its checkpoints), or choose another --output_dir"
                              ) from None
        except OSError:  # no locks on this file system
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            _remove_dirs(made)
            return
        try:  # the holder before us may have removed the file it locked: then lock the one now at path
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _HELD_RUN_LOCKS[path] = (fd, made)


def _remove_dirs(made: list[str]) -> None:
    """Remove the directories ``lock_run`` made (deepest first) where they are still empty."""
    for folder in made:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def releases_run_locks(fn):
    """Decorator: the run locks that ``fn`` takes are released when it returns or raises, and their files
    removed (a refused run leaves nothing behind)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD_RUN_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for path in set(_HELD_RUN_LOCKS) - before:
                fd, made = _HELD_RUN_LOCKS.pop(path)
                with contextlib.suppress(OSError):
                    os.unlink(path)  # still locked: a process opening it now retries on the new file
                os.close(fd)
                _remove_dirs(made)  # a trained run's directory is inside: they stay
    return wrapper


def check_stored_plan(run_dir: str, plan, force: bool, resume: str = "") -> None:
    """Refuse a run directory whose plan.json splits other channel groups than ``plan``. Run directories are
    named by the hash of the hparams, not of the plan they make; when a preset's rule or the model's graph
    (a timm upgrade) changes, the same name would otherwise serve a finished or checkpointed run of another
    partition as this one. ``--force`` without ``--resume`` renames the old directory anyway, so it passes;
    an unreadable plan.json (a run killed while writing it) cannot be compared and is rewritten."""
    path = os.path.join(run_dir, "plan.json")
    if (force and not resume) or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            stored = json.load(f)
        before = {g["name"]: g["channels"] for g in stored["split"]}
        workers = stored["workers"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = {g.name: g.channels for g in plan.split}
    if before == now and workers == plan.workers:
        return
    gone = ", ".join(sorted(set(before) - set(now))) or "none"
    new = ", ".join(sorted(set(now) - set(before))) or "none"
    resized = ", ".join(sorted(n for n in set(before) & set(now) if before[n] != now[n]))
    resized = f"; other channel counts: {resized}" if resized else ""
    raise ConfigError(f"{run_dir} was made with another partition plan than this code makes for the same hparams "
                      f"(split there only: {gone}; split now only: {new}{resized}): the preset's rule or the "
                      "model's graph has changed since, so its results are not this run's; pass --force to train it "
                      "again (the old directory is kept, renamed) or choose another --output_dir")


def truncate_logs(run_dir: str, rounds_done: int) -> None:
    """Keep only log lines of rounds up to ``rounds_done`` (a resumed run rewrites the rest)."""
    for log in ("metrics.jsonl", "rounds.jsonl"):
        path = os.path.join(run_dir, log)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= rounds_done]
        with open(path, "w") as f:
            f.writelines(lines)
