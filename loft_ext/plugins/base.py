"""Training-loop plugins: the only way to change what the loop does besides its hparams.

Events, called on every rank, in this order (see docs/plugins.md)::

    on_fit_start
    per round:  on_round_start       partition known, slices loaded
                on_local_step_end    after every local step of every local worker (no collectives!)
                on_before_sync
                (sync)
                on_after_sync        ``model`` is the assembled full model when some plugin asked
                                     for it through ``wants_model`` (identical on every rank), else None
                [on_evaluation, on_epoch_end]   at epoch ends
                on_round_end         the round is complete (checkpoints are written here)
                on_ticket_found      when a detector calls ``loop.ticket_found``
    on_prune, on_checkpoint_save, on_checkpoint_load   when those happen
    on_fit_end

A plugin that decides something that changes control flow (``loop.request_stop``) must decide it
from the assembled model (identical on every rank) or from values agreed by a collective; the loop
also agrees on stop requests with one all-reduce per round, so a rank cannot run on alone.
"""
from __future__ import annotations

from typing import Any


class Plugin:
    """Base class: override the events you need; ``state_dict`` must be JSON-serialisable."""

    name = "plugin"

    def wants_model(self, loop, round_index: int, epoch_end: bool) -> bool:
        """Whether this plugin needs the assembled model in ``on_after_sync`` of this round."""
        return False

    def on_fit_start(self, loop) -> None: ...
    def on_round_start(self, loop, round_index: int) -> None: ...
    def on_local_step_end(self, loop, worker: int, step: int, loss: float) -> None: ...
    def on_before_sync(self, loop, round_index: int) -> None: ...
    def on_after_sync(self, loop, round_index: int, model) -> None: ...
    def on_evaluation(self, loop, metrics: dict) -> None: ...
    def on_epoch_end(self, loop, epoch: int, metrics: dict) -> None: ...
    def on_round_end(self, loop, round_index: int) -> None: ...
    def on_ticket_found(self, loop, detector: str, info: dict) -> None: ...
    def on_prune(self, loop, masks: Any) -> None: ...
    def on_checkpoint_save(self, loop, state: dict) -> None: ...
    def on_checkpoint_load(self, loop, state: dict) -> None: ...
    def on_fit_end(self, loop, metrics: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
