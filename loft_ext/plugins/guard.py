"""Stops a run whose training produced non-finite values, naming the worker, round and layer."""
from __future__ import annotations

import math

import torch

from .base import Plugin


class NonFiniteGuard(Plugin):
    """Checks every local step's loss and, before each sync, every local worker's parameters and
    buffers. A non-finite value makes the loop fail the round on every rank (``loop.fail``) before the
    round is checkpointed, so the last checkpoint on disk stays the last good one."""

    name = "nonfinite_guard"

    def __init__(self):
        self.bad_loss: tuple[int, int, float] | None = None  # (worker, step, loss) of this round

    def on_round_start(self, loop, round_index: int) -> None:
        self.bad_loss = None

    def on_local_step_end(self, loop, worker: int, step: int, loss: float) -> None:
        if self.bad_loss is None and not math.isfinite(loss):
            self.bad_loss = (worker, step, loss)

    def on_before_sync(self, loop, round_index: int) -> None:
        for w in loop.engine.workers:
            tensors = [(n, t) for n, t in w.slicer.sub_tensors.items() if t.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).all().item()
            bad_layer = None if finite else next(n for n, t in tensors if not torch.isfinite(t).all())
            loss = self.bad_loss if self.bad_loss and self.bad_loss[0] == w.index else None
            if bad_layer is None and loss is None:
                continue
            where = f"round {round_index + 1}, worker {w.index}"
            what = []
            if loss is not None:
                what.append(f"loss {loss[2]} at local step {loss[1] + 1}")
            what.append(f"first non-finite tensor: {bad_layer}" if bad_layer else "parameters still finite")
            loop.fail(f"non-finite values in {where}: {'; '.join(what)}. The run stopped before this round "
                      "was checkpointed; lower --lr (or check the data)")
            return
