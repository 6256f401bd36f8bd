"""LoFT checkpoints at round boundaries, and resuming from them bit for bit (docs/reliability.md).

A checkpoint (``<run_dir>/checkpoints/round_<k>/``, written through :class:`CheckpointStore`, so
atomically and with a checksummed manifest) holds:

- the assembled model after round k: in one process ``model.safetensors``; with several processes
  ``model/``, a sharded ``torch.distributed.checkpoint`` (DCP) in which every rank writes its own 1/W of
  every tensor (the dim-0 chunk a DTensor ``Shard(0)`` over the W ranks holds: ``model/__<rank>_0.distcp``,
  and DCP's ``model/.metadata``), so no rank gathers or writes the whole model (under ``alltoall`` the full
  model is assembled first, as for evaluation). Loading reads it back whole on every rank (DCP reshards
  the chunks into full tensors), whatever the number of processes that wrote it;
- ``rank<r>.safetensors``: rank r's tensors: optimizer state the engine keeps across rounds
  (``--optimizer_state carry``; under ``alltoall`` the slabs of it this rank owns) and its RNG states
  (torch CPU/CUDA and the run's own generators);
- ``rank<r>.json``: rank r's loop state (round, epoch, history, tickets, losses since the last epoch end,
  every plugin's state), data-stream positions, Python/NumPy RNG states and communication counters;
- ``state.json``: what the checkpoint belongs to (model, S, D, method, hparams), checked on resume;
- ``deepspeed/``: under ``--deepspeed``, each worker engine's ``save_checkpoint``.

DeepSpeed's files and DCP's ``.metadata`` are pickles: they are read only after their checksums match
the manifest.
"""
from __future__ import annotations

import json
import os
import random
import re
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..checkpoint import CheckpointError, CheckpointStore, read_manifest, verify
from ..parallel.comm import Counter
from ..parallel.sharded import shard_of
from ..plugins.base import Plugin

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"  # the assembled model of a one-process run
MODEL_SHARDS = "model"            # ... of a multi-process run: a DCP checkpoint, one file per rank
# what must match for a checkpoint to continue this run (the rest of the hparams are compared too)
IDENTITY = ("model", "dataset", "method", "workers", "replicas", "world", "preset", "sync", "optimizer_state",
            "deepspeed")


def checkpoint_name(rounds_done: int) -> str:
    return f"round_{rounds_done:06d}"


def _barrier(engine) -> None:
    if engine.grid is not None:
        dist.barrier()


def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {"rng|torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"rng|cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    out.update({f"gen|{name}": g.get_state() for name, g in generators.items()})
    return out


def set_rng(tensors: dict[str, torch.Tensor], host: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng|torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng|cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for name, g in generators.items():
        g.set_state(tensors[f"gen|{name}"])
    version, state, gauss = host["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def host_rng() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss),
                                                               float(cached)]}


# ------------------------------------------------------------------------------------------ the model
def save_model_shards(state: dict[str, torch.Tensor], folder: str) -> None:
    """Write a model every rank holds as a DCP checkpoint in which rank r writes only its chunk r of W of
    every tensor (a DTensor ``Shard(0)`` over the default group; 0-dim tensors are replicated, and DCP
    writes them once). Collective over all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = list(state.values())
    mesh = DeviceMesh.from_group(dist.group.WORLD, tensors[0].device.type if tensors else "cpu")
    shards = {}
    for name, t in state.items():
        t = t.detach()
        if t.dim() == 0:
            shards[name] = DTensor.from_local(t.clone(), mesh, [Replicate()], run_check=False)
        else:  # contiguous chunks of a contiguous whole (a channels_last tensor is stored in the default layout)
            shape = tuple(t.shape)
            shards[name] = DTensor.from_local(shard_of(t, world, rank).contiguous(), mesh, [Shard(0)],
                                              run_check=False, shape=shape,
                                              stride=torch.empty(shape, device="meta").stride())
    dcp.save(shards, storage_writer=dcp.FileSystemWriter(folder))


def load_model_shards(folder: str, model: torch.nn.Module, where: str = "") -> None:
    """Fill ``model`` in place from a :func:`save_model_shards` checkpoint, every tensor whole (DCP reads
    and joins the chunks of any number of writers); needs no process group. The tensor names and shapes
    are checked first, so a checkpoint of another model is refused by name (``where`` names the checkpoint
    in the message; default ``folder``)."""
    where = where or folder
    state = model.state_dict()
    reader = dcp.FileSystemReader(folder)
    saved = {k: tuple(v.size) for k, v in reader.read_metadata().state_dict_metadata.items() if hasattr(v, "size")}
    missing, unexpected = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where!r} holds another model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}; resume with the --model of that run")
    for name, t in state.items():
        if tuple(t.shape) != saved[name]:
            raise CheckpointError(f"checkpoint {where!r} has {name} of shape {saved[name]}, this model "
                                  f"{tuple(t.shape)}; resume with the model and data set of that run")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is, per rank
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)


# ------------------------------------------------------------------------------------------ saving
class Checkpointer(Plugin):
    """Saves a checkpoint every ``every`` rounds (0: never on a schedule) and when the run is preempted.

    Every rank writes its own files into the staging directory; rank 0 commits (checksums, manifest,
    rename) once all are written. Needs the run directory on a filesystem every rank sees.
    """

    name = "checkpointer"

    def __init__(self, store: CheckpointStore, every: int, identity: dict, streams: dict,
                 generators: dict[str, torch.Generator], rank: int, main: bool, print_fn=print):
        self.store, self.every, self.identity = store, every, identity
        self.streams, self.generators = streams, generators
        self.rank, self.main, self.print = rank, main, print_fn
        self.last: str | None = None

    def on_round_end(self, loop, round_index: int) -> None:
        done = round_index + 1
        scheduled = self.every > 0 and done % self.every == 0 and done < loop.rounds and not loop.stop
        if scheduled or loop.preempted:
            self.save(loop)

    def save(self, loop) -> str:
        engine = loop.engine
        name = checkpoint_name(loop.state.round_index)
        if self.main:
            self.store.begin(name)
        _barrier(engine)
        staging = self.store.staging(name)
        model = engine.assembled()
        try:
            if engine.grid is not None:
                save_model_shards(model.state_dict(), os.path.join(staging, MODEL_SHARDS))
            elif self.main:
                save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                          os.path.join(staging, MODEL_FILE))
        finally:
            engine.release()
        save_file({**engine.strategy.state_dict(), **rng_tensors(self.generators)},
                  os.path.join(staging, f"rank{self.rank}.safetensors"))
        grid = engine.grid
        rank_state = {"rank": self.rank, "grid": [grid.filter_index, grid.data_index] if grid else None,
                      "loop": loop.progress_state(), "host_rng": host_rng(),
                      "streams": {str(k): s.state_dict() for k, s in self.streams.items()},
                      "comm": engine.comm.totals()}
        with open(os.path.join(staging, f"rank{self.rank}.json"), "w") as f:
            json.dump(rank_state, f)
        for w in engine.workers:
            if w.ds_engine is not None:  # collective over all ranks; files per worker and replica
                w.ds_engine.save_checkpoint(os.path.join(staging, "deepspeed"), tag=name, save_latest=False)
        _barrier(engine)
        path = os.path.join(self.store.root, name)
        if self.main:
            with open(os.path.join(staging, "state.json"), "w") as f:
                json.dump({**self.identity, "round": loop.state.round_index}, f, indent=1, default=list)
            path = self.store.commit(name, {"round": loop.state.round_index, "run": self.identity["run"]})
            self.print(f"checkpoint after round {loop.state.round_index}: {path}", flush=True)
        _barrier(engine)  # nobody reports the checkpoint (or exits on preemption) before it is committed
        self.last = path
        return path


# ------------------------------------------------------------------------------------------ resuming
def find_checkpoint(resume: str, run_dir: str) -> str | None:
    """The checkpoint ``--resume`` names: ``latest`` (the run directory's newest complete one, or None
    when there is none) or a checkpoint directory."""
    if not resume:
        return None
    path = CheckpointStore(os.path.join(run_dir, CHECKPOINT_DIR)).latest() if resume == "latest" else resume
    if path is not None:
        verify(path)  # every file against its checksum, before anything is read
    return path


def check_identity(path: str, identity: dict) -> dict:
    """The checkpoint's ``state.json``, refused with the mismatch named when it belongs to another run."""
    verify(path, only=["state.json"])
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)
    for key in IDENTITY:
        if saved.get(key) != identity.get(key):
            raise CheckpointError(f"checkpoint {path!r} was written with {key}={saved.get(key)!r}, this run has "
                                  f"{key}={identity.get(key)!r}; resume with the flags of that run, or start a new "
                                  "run without --resume")
    for group, values in identity["hparams"].items():
        for key, value in values.items():
            old = saved["hparams"].get(group, {}).get(key)
            if json.loads(json.dumps(old)) != json.loads(json.dumps(value, default=list)):
                raise CheckpointError(f"checkpoint {path!r} was written with --{key} {old!r}, this run has "
                                      f"--{key} {value!r}; resume with the flags of that run, or start a new run "
                                      "without --resume")
    return saved


def load_model(path: str, model: torch.nn.Module) -> int:
    """Load the checkpoint's assembled model (before the engine is built from it); returns its round."""
    files = read_manifest(path)["files"]
    shards = [f for f in files if f.startswith(MODEL_SHARDS + "/")]
    if MODEL_FILE in files:
        verify(path, only=[MODEL_FILE])
        model.load_state_dict(load_file(os.path.join(path, MODEL_FILE)), strict=True)
    elif shards:
        verify(path, only=shards)  # DCP's metadata is a pickle: checked before it is read
        load_model_shards(os.path.join(path, MODEL_SHARDS), model, path)
    else:
        raise CheckpointError(f"checkpoint {path!r} holds no model ({MODEL_FILE} or {MODEL_SHARDS}/); it is not a "
                              "loft_ext checkpoint")
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)["round"]


def rank_with_coords(path: str, grid, rank: int) -> int:
    """The rank whose files hold this rank's grid coordinates (worker, replica): the same rank unless the
    run was resumed under another --grid_order or the launcher numbered the nodes differently."""
    if grid is None:
        return rank
    want = [grid.filter_index, grid.data_index]
    for name in sorted(os.listdir(path)):
        match = re.fullmatch(r"rank(\d+)\.json", name)
        if not match:
            continue
        with open(os.path.join(path, name)) as f:
            saved = json.load(f).get("grid")
        if saved is None:  # written before coordinates were recorded: files are by rank
            return rank
        if saved == want:
            return int(match.group(1))
    return rank


def restore(path: str, loop, streams: dict, generators: dict[str, torch.Generator], rank: int) -> None:
    """Everything but the model: engine tensors, loop and plugin state, streams, counters, RNG."""
    engine = loop.engine
    saved_rank = rank_with_coords(path, engine.grid, rank)
    files = [f"rank{saved_rank}.safetensors", f"rank{saved_rank}.json"]
    manifest = verify(path, only=files)
    tensors = load_file(os.path.join(path, files[0]))
    with open(os.path.join(path, files[1])) as f:
        state = json.load(f)
    device = next(engine.workers[0].model.parameters()).device
    engine.strategy.load_state_dict({k: v for k, v in tensors.items() if k.startswith(("opt|", "slab|"))}, device)
    loop.load_progress_state(state["loop"])
    for key, stream_state in state["streams"].items():
        streams[int(key)].load_state_dict(stream_state)
    for phase, c in state["comm"].items():
        engine.comm.counters[phase] = Counter.from_dict(c)
    for w in engine.workers:
        if w.ds_engine is not None:
            verify(path, only=[f for f in manifest["files"] if f.startswith("deepspeed/")])
            tag = os.path.basename(os.path.normpath(path))
            loaded, _ = w.ds_engine.load_checkpoint(os.path.join(path, "deepspeed"), tag=tag,
                                                    load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint {tag!r} under {path}/deepspeed")
    set_rng(tensors, state["host_rng"], generators)
