"""Reads the records of a W&B offline run file (``run-<id>.wandb``) for tests.

The file is a 7-byte W&B header followed by LevelDB-log framing (32 KiB blocks; each record chunk has
a 4-byte checksum, 2-byte little-endian length and 1-byte type: 1 full, 2 first, 3 middle, 4 last)
around serialised ``wandb_internal_pb2.Record`` messages.
"""
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
