"""Pruning hooks as plugins: draw tickets during pretraining, and keep their masks in force afterwards.

- :func:`draw_ticket`: a structured or unstructured ticket (its masks and a JSON description) from a
  model; the pipeline and :class:`TicketDrawer` both use it.
- :class:`TicketDrawer`: draws a ticket from the assembled model when a detector fires (``on_ticket_found``)
  or after given rounds, and emits ``on_prune`` with its masks to every plugin.
- :class:`MaskEnforcement`: keeps pruned weights (and their optimizer state) at zero through training,
  in the pipeline's fine-tuning or a user's own loop (``after_step(optimizer)`` after each step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models import default_input_shape
from ..partition.plan import DEFAULT_PRESET, make_plan
from ..plugins.base import Plugin
from .masks import MaskEnforcer
from .prune import (PruneError, StructuredTicket, magnitude_masks, random_masks_like, random_ticket_like, sparsity_report,
                    structured_ticket)

KINDS = ("structured", "unstructured")


@dataclass
class Ticket:
    """Keep-masks by tensor name (True = kept) and what they are (kind, ratio, score, kept units...)."""

    masks: dict[str, torch.Tensor]
    meta: dict
    structured: StructuredTicket | None = None  # kept units per split group (compact_model exports them)

    def sparsity(self, model: nn.Module) -> dict:
        return sparsity_report(model, self.masks)


def draw_ticket(model: nn.Module, ratio: float, kind: str = "structured", score: str = "l2", *,
                plan=None, preset: str = DEFAULT_PRESET, input_shape=None, scope: str = "per-group", min_keep: int = 1,
                levels: int = 1, seed: int = 0, random_control: bool = False) -> Ticket:
    """A ticket of ``model`` at pruning ratio ``ratio`` (fraction removed).

    ``structured``: whole channel units of the split groups of ``plan`` (made with S=1; built from
    ``preset`` / ``input_shape`` when not given), scored by ``score`` (l2, l1, bn or random).
    ``unstructured``: global magnitude of conv/linear weights, ``levels`` rounds of it.
    ``random_control``: the same per-group counts (per-layer ratios), chosen at random.
    """
    if kind not in KINDS:
        raise PruneError(f"unknown ticket kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "structured":
        if plan is None:
            plan = make_plan(model, 1, preset, tuple(input_shape or default_input_shape(model)))
        ticket = structured_ticket(model, plan, ratio, scope, "l2" if score == "random" else score, min_keep, seed)
        if random_control or score == "random":
            ticket = random_ticket_like(ticket, seed)
        meta = {"kind": "structured", "ratio": ratio, "score": score, "scope": scope,
                "groups": [{**r, "kept": k.tolist()} for r, k in zip(ticket.report(), ticket.kept)]}
        return Ticket(ticket.masks(model), meta, ticket)
    masks = None
    for _ in range(levels):
        masks = magnitude_masks(model, ratio, masks)
    if random_control or score == "random":
        masks = random_masks_like(masks, seed)
    return Ticket(masks, {"kind": "unstructured", "ratio_per_level": ratio, "levels": levels, "score": score})


class TicketDrawer(Plugin):
    """Draws a ticket from the assembled model when a detector fires or after the given rounds.

    Place it after the detectors in the plugin list: it reads their ``on_ticket_found`` of the same
    round. Every drawn ticket is appended to ``tickets`` (round, reason, meta, masks) and passed to every
    plugin through ``on_prune(run, masks)``.
    """

    name = "ticket_drawer"

    def __init__(self, ratio: float = 0.5, kind: str = "structured", score: str = "l2",
                 at_rounds: tuple[int, ...] = (), on_detectors: tuple[str, ...] | None = None,
                 scope: str = "per-group", seed: int = 0):
        self.ratio, self.kind, self.score, self.scope, self.seed = ratio, kind, score, scope, seed
        self.at_rounds = set(at_rounds)
        self.on_detectors = None if on_detectors is None else set(on_detectors)  # None: any detector
        self.pending: list[str] = []
        self.tickets: list[dict] = []

    def wants_model(self, run, round_index, epoch_end):
        # a detector that fires had the model assembled for itself; fixed rounds need it here
        return (round_index + 1) in self.at_rounds

    def on_ticket_found(self, run, detector, info):
        if self.on_detectors is None or detector in self.on_detectors:
            self.pending.append(detector)

    def on_after_sync(self, run, round_index, model):
        reasons = list(self.pending) + (["round"] if (round_index + 1) in self.at_rounds else [])
        self.pending.clear()
        if not reasons or model is None:
            return
        plan = make_plan(model, 1, run.engine.plan.preset, run.engine.plan.input_shape) \
            if self.kind == "structured" else None
        ticket = draw_ticket(model, self.ratio, self.kind, self.score, plan=plan, scope=self.scope, seed=self.seed)
        self.tickets.append({"round": round_index + 1, "reasons": reasons, "meta": ticket.meta,
                             "masks": ticket.masks})
        run.emit("on_prune", ticket.masks)

    def state_dict(self) -> dict:
        return {"tickets": [{k: v for k, v in t.items() if k != "masks"} for t in self.tickets]}


class MaskEnforcement(Plugin):
    """Keeps a ticket's pruned entries at zero: masks applied once, gradients masked, and after every
    optimizer step the weights and every optimizer-state tensor shaped like them multiplied by the mask.

    In a user's loop: ``enforce = MaskEnforcement(model, masks); enforce.start()`` then
    ``enforce.after_step(optimizer)`` after each ``optimizer.step()``; ``enforce.stop()`` at the end. As a
    plugin of a loop that emits events: ``on_fit_start`` / ``on_local_step_end`` / ``on_fit_end``.
    """

    name = "mask_enforcement"

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], optimizer=None):
        self.enforcer = MaskEnforcer(model, masks)
        self.optimizer = optimizer

    def start(self) -> None:
        self.enforcer.apply()
        self.enforcer.hook_gradients()

    def after_step(self, optimizer=None) -> None:
        opt = optimizer or self.optimizer
        self.enforcer.after_step(getattr(opt, "optimizer", opt))

    def stop(self) -> None:
        self.enforcer.remove()

    def on_fit_start(self, run):
        self.start()

    def on_local_step_end(self, run, worker, step, loss):
        self.after_step()

    def on_fit_end(self, run, metrics):
        self.stop()
