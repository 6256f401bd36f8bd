"""Progress on the main process: a tqdm bar over rounds, and one printed line per epoch."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from .base import Plugin


class Progress(Plugin):
    """Bar over rounds with the latest loss and accuracy (off when stderr is not a terminal) and an
    epoch line on stdout: round, lr, each worker's mean loss, the assembled model's test accuracy."""

    name = "progress"

    def __init__(self, print_fn=print, bar: bool | None = None):
        self.print, self.bar_enabled = print_fn, bar
        self.bar = None
        self.t0 = time.time()

    def on_fit_start(self, loop) -> None:
        self.t0 = time.time()
        self.bar = tqdm(total=loop.rounds, initial=loop.state.round_index, unit="round",
                        disable=None if self.bar_enabled is None else not self.bar_enabled, leave=False)

    def on_after_sync(self, loop, round_index: int, model) -> None:
        self.bar.update(1)
        if loop.state.round_losses and loop.state.round_losses[0]:
            self.bar.set_postfix(loss=f"{loop.state.round_losses[0][-1]:.3f}", refresh=False)

    def on_ticket_found(self, loop, detector: str, info: dict) -> None:
        self.print(f"ticket found by {detector} at round {info['round']}", flush=True)

    def on_epoch_end(self, loop, epoch: int, m: dict) -> None:
        losses = " ".join(f"{x:.4f}" for x in m["worker_loss"])
        self.print(f"epoch {epoch:3d} round {m['round']:5d} lr {m['lr']:.4f} | worker loss {losses} | "
                   f"test acc {100 * m['test_acc']:.2f}% loss {m['test_loss']:.4f} | "
                   f"{time.time() - self.t0:.0f}s", flush=True)

    def on_fit_end(self, loop, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.close()
        if loop.stop_reasons:
            self.print(f"pretraining stopped at round {loop.state.round_index}: {loop.stop_reasons[0]}", flush=True)
