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
                on_ticket_found      when a detector calls ``run.ticket_found``
    on_prune (a ticket was drawn: its masks), on_checkpoint_save, on_checkpoint_load   when those happen
    on_fit_end

Every event's first argument is the run (:class:`LoftRun`: the :class:`loft_ext.LoFT` helper in a
pretraining loop, the fine-tuning loop in the ticket stage). A plugin that decides something that
changes control flow (``run.request_stop``) must decide it from the assembled model (identical on every
rank) or from values agreed by a collective; the run also agrees on stop requests with one all-reduce
per round, so a rank cannot run on alone. An exception inside a plugin stops the run with a
:class:`~loft_ext.errors.PluginError` naming the plugin, the event and the round.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed
import torch.nn as nn

from ..errors import LoftError, PluginError

EVENTS = ("on_fit_start", "on_round_start", "on_local_step_end", "on_before_sync", "on_after_sync",
          "on_evaluation", "on_epoch_end", "on_round_end", "on_ticket_found", "on_prune",
          "on_checkpoint_save", "on_checkpoint_load", "on_fit_end")


@runtime_checkable
class LoftRun(Protocol):
    """What plugins may read and call (documented in docs/plugins.md; nothing else is promised).

    ``state``: ``round_index`` (rounds done), ``epoch``, ``local_step``, ``round_losses`` (this round, per
    local worker), ``history`` (epoch metrics), ``tickets``. ``engine``: ``full`` (the full model, current
    after a sync under ``allgather``), ``plan`` (split groups), ``workers`` (``index``, ``model``: the
    sub-network, ``slicer``), ``partition``, ``grid`` (None in one process). ``logger.log(dict, step)``.
    ``lr``: the learning rate of the round being trained (None when the loop sets none).
    """

    state: Any
    engine: Any
    logger: Any
    rounds: int
    rounds_per_epoch: int
    local_index: dict
    stop_reasons: list

    @property
    def lr(self) -> float | None: ...

    def is_epoch_end(self, round_index: int) -> bool: ...
    def request_stop(self, reason: str, preempt: bool = False) -> None: ...
    def fail(self, message: str) -> None: ...
    def ticket_found(self, detector: str, info: dict) -> None: ...


class Plugin:
    """Base class: override the events you need; ``state_dict`` must be JSON-serialisable."""

    name = "plugin"

    def wants_model(self, run: LoftRun, round_index: int, epoch_end: bool) -> bool:
        """Whether this plugin needs the assembled model in ``on_after_sync`` of this round."""
        return False

    def on_fit_start(self, run: LoftRun) -> None: ...
    def on_round_start(self, run: LoftRun, round_index: int) -> None: ...
    def on_local_step_end(self, run: LoftRun, worker: int, step: int, loss: float) -> None: ...
    def on_before_sync(self, run: LoftRun, round_index: int) -> None: ...
    def on_after_sync(self, run: LoftRun, round_index: int, model: nn.Module | None) -> None: ...
    def on_evaluation(self, run: LoftRun, metrics: dict) -> None: ...
    def on_epoch_end(self, run: LoftRun, epoch: int, metrics: dict) -> None: ...
    def on_round_end(self, run: LoftRun, round_index: int) -> None: ...
    def on_ticket_found(self, run: LoftRun, detector: str, info: dict) -> None: ...
    def on_prune(self, run: LoftRun, masks: Any) -> None: ...
    def on_checkpoint_save(self, run: LoftRun, state: dict) -> None: ...
    def on_checkpoint_load(self, run: LoftRun, state: dict) -> None: ...
    def on_fit_end(self, run: LoftRun, metrics: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _collective_failure(exc: Exception) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(exc)
    return isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection", "timed out", "Timed out")))


def emit(plugins, event: str, run, *args) -> None:
    """Call ``event`` on every plugin in order; an unexpected exception becomes a PluginError naming the
    plugin, the event and the round (loft_ext's own errors, e.g. a TrainingFailure, pass unchanged)."""
    for p in plugins:
        try:
            getattr(p, event)(run, *args)
        except LoftError:
            raise
        except Exception as exc:
            if _collective_failure(exc):
                raise  # a peer died or hung: the run reports it with the resume hint, not as a plugin bug
            state = getattr(run, "state", None)
            where = f" in round {state.round_index + 1}" if hasattr(state, "round_index") else ""
            raise PluginError(f"plugin {getattr(p, 'name', type(p).__name__)!r} ({type(p).__name__}) failed in "
                              f"{event}{where}: {type(exc).__name__}: {exc}") from exc
