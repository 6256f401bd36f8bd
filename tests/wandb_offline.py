"""Reads the records of a W&B offline run file (``run-<id>.wandb``) for tests.

The file is a 7-byte W&B header followed by LevelDB-log framing (32 KiB blocks; each record chunk has
a 4-byte checksum, 2-byte little-endian length and 1-byte type: 1 full, 2 first, 3 middle, 4 last)
around serialised ``wandb_internal_pb2.Record`` messages.
"""
import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def history_keys(path):
    """Every key logged to the run's history, and the number of history rows."""
    keys, rows = set(), 0
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows += 1
            keys.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
    return keys, rows


def _items(updates):
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def run_info(path):
    """One offline run: id, group, job_type, its config and final summary (key -> value; a key set to
    None is there with None) and the artifacts it logged (name, type, metadata, file paths)."""
    info = {"path": path, "id": None, "group": None, "job_type": None, "config": {}, "summary": {}, "artifacts": []}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(id=rec.run.run_id, group=rec.run.run_group, job_type=rec.run.job_type)
            info["config"].update(_items(rec.run.config.update))
        elif kind == "config":
            info["config"].update(_items(rec.config.update))
        elif kind == "summary":
            info["summary"].update(_items(rec.summary.update))
        elif kind == "artifact":
            info["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                      "metadata": json.loads(rec.artifact.metadata or "{}"),
                                      "files": sorted(e.path for e in rec.artifact.manifest.contents)})
    info["config"].pop("_wandb", None)
    return info


def runs_by_job_type(wandb_dir):
    """{job_type: [run_info, ...]} of every offline run under ``wandb_dir`` (``<run_dir>/wandb``)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(str(wandb_dir), "offline-run-*", "run-*.wandb"))):
        info = run_info(path)
        found.setdefault(info["job_type"], []).append(info)
    return found
