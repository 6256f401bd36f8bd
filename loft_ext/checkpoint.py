"""Atomic, verifiable checkpoint directories (no LoFT knowledge: the engine decides what goes in).

A checkpoint is a directory ``<root>/<name>/`` whose ``manifest.json`` lists every file with its size
and sha256. It is written into ``<root>/.staging-<name>/`` first; only when every file is there and
fsynced does the manifest get written and the directory renamed into place, so a crash at any
moment leaves either the complete new checkpoint or none (the previous ones untouched). The last
``keep`` complete checkpoints are kept. Loading verifies the manifest first; tensors are read with
safetensors and metadata with JSON, so loading never executes pickled code.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from loft_ext.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1
STAGING = ".staging-"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, corrupt or of another configuration."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename: readers see old or new."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock on ``path`` (created if missing) for a read-modify-write of a file that
    several processes may update at once (two pipelines drawing tickets from one pretraining)."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _files_under(folder: str) -> list[str]:
    out = []
    for base, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(base, n), folder) for n in names]
    return sorted(out)


class CheckpointStore:
    """The checkpoints of one run under ``root``; names sort in save order (e.g. ``round_000012``)."""

    def __init__(self, root: str, keep: int = 2):
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1 checkpoint (got {keep})")
        self.root, self.keep = root, keep

    def staging(self, name: str) -> str:
        return os.path.join(self.root, STAGING + name)

    def begin(self, name: str) -> str:
        """An empty staging directory for ``name`` (a leftover of a crashed write is discarded)."""
        path = self.staging(name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def commit(self, name: str, meta: dict) -> str:
        """Checksum and fsync every staged file, write the manifest, rename into place, drop old ones."""
        staging = self.staging(name)
        files = {}
        for rel in _files_under(staging):
            full = os.path.join(staging, rel)
            _fsync_path(full)
            files[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
        manifest = {"format": FORMAT, "name": name, "created": time.time(), "meta": meta, "files": files}
        write_json_atomic(os.path.join(staging, MANIFEST), manifest)
        final = os.path.join(self.root, name)
        if os.path.exists(final):  # the same round saved again (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_path(self.root)
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        return final

    def complete(self) -> list[str]:
        """Names of the checkpoints whose manifest exists, oldest first (staging dirs never count)."""
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root)
                      if not n.startswith(".") and os.path.isfile(os.path.join(self.root, n, MANIFEST)))

    def latest(self) -> str | None:
        names = self.complete()
        return os.path.join(self.root, names[-1]) if names else None


def read_manifest(path: str) -> dict:
    """The manifest of the checkpoint directory ``path``; refuses a directory that is not one."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass a directory such as "
                              "<run_dir>/checkpoints/round_000012, or --resume latest")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path!r} has no {MANIFEST}: it is not a complete checkpoint (a write that was "
                              "interrupted never gets one); resume from an earlier checkpoint")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path!r} is not readable JSON ({exc}); the checkpoint is corrupt") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} has checkpoint format {manifest.get('format')!r}; this loft_ext reads "
                              f"format {FORMAT}")
    return manifest


def verify(path: str, only: list[str] | None = None) -> dict:
    """Check size and sha256 of every file (or of ``only``) against the manifest; returns the manifest."""
    manifest = read_manifest(path)
    for rel in only if only is not None else list(manifest["files"]):
        entry = manifest["files"].get(rel)
        full = os.path.join(path, rel)
        if entry is None:
            raise CheckpointError(f"checkpoint {path!r} has no file {rel!r}; it was written by another "
                                  "configuration or a different number of processes")
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint file {full!r} is missing; resume from an earlier checkpoint")
        if os.path.getsize(full) != entry["bytes"]:
            raise CheckpointError(f"checkpoint file {full!r} is truncated or changed ({os.path.getsize(full)} "
                                  f"bytes, manifest says {entry['bytes']}); resume from an earlier checkpoint")
        if sha256_file(full) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {full!r} is corrupt (sha256 differs from the manifest); "
                                  "resume from an earlier checkpoint")
    return manifest
