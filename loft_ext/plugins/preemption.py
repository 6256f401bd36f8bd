"""Preemption: SIGTERM or SIGINT ends the run at the next round boundary, checkpointed, resumable."""
from __future__ import annotations

import signal
import threading

from .base import Plugin

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption(Plugin):
    """Installs handlers for SIGTERM and SIGINT for the duration of the fit. The first signal asks the
    loop to stop after the current round (``loop.request_stop(..., preempt=True)``: agreed with the
    other ranks, checkpointed by the checkpointer, the run left unfinished); further signals (e.g.
    torchrun forwarding the same preemption) are only noted. ``received`` is the first signal."""

    name = "preemption"

    def __init__(self, print_fn=print):
        self.print = print_fn
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            self.print(f"received {signal.Signals(signum).name}: stopping at the end of this round with a checkpoint",
                       flush=True)

    def on_fit_start(self, loop) -> None:
        if threading.current_thread() is threading.main_thread():  # Python only allows it there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_after_sync(self, loop, round_index: int, model) -> None:
        if self.received is not None:
            loop.request_stop(f"preempted by {signal.Signals(self.received).name}", preempt=True)

    def on_fit_end(self, loop, metrics: dict) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
