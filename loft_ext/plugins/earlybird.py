"""Early-Bird tickets (You et al., ICLR 2020) as a detector plugin, following its reference rule.

At every check (every epoch end, or every ``every`` rounds): the |gamma| of every BatchNorm layer are
concatenated; the threshold is the value at index int(total * ratio) of their ascending sort; the mask
keeps the channels with |gamma| strictly above it. The last ``keep`` = 5 masks are kept (FIFO); once
there are 5, the distance of the newest to each of the 4 older ones is 1 - (fraction of equal
entries), and the ticket has emerged when none of the 4 distances exceeds ``threshold`` = 0.1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Plugin


def bn_channel_mask(model: nn.Module, ratio: float) -> torch.Tensor:
    """Global channel mask from |gamma| of all BatchNorm2d layers at pruning ratio ``ratio``."""
    gammas = [m.weight.detach().abs().float().cpu().reshape(-1) for m in model.modules()
              if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
    if not gammas:
        raise ValueError("Early-Bird needs BatchNorm2d layers with affine weights; this model has none")
    values = torch.cat(gammas)
    threshold = torch.sort(values).values[int(values.numel() * ratio)]
    return values.gt(threshold)


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance of two masks."""
    return 1.0 - float((a == b).sum()) / b.numel()


class EarlyBirdRule:
    """The reference rule on a stream of masks (no model needed: testable on recorded masks)."""

    def __init__(self, keep: int = 5, threshold: float = 0.1):
        self.keep, self.threshold = keep, threshold
        self.masks: list[torch.Tensor] = []
        self.dists: list[float] = [1.0] * (keep - 1)

    def put(self, mask: torch.Tensor) -> bool:
        """Add the newest mask; True when the ticket has emerged by this check."""
        self.masks = (self.masks + [mask])[-self.keep:]
        if len(self.masks) < self.keep:
            return False
        self.dists = [mask_distance(self.masks[-1], m) for m in self.masks[:-1]]
        return all(d <= self.threshold for d in self.dists)


class EarlyBird(Plugin):
    """Checks the Early-Bird rule on the assembled model; fires once, stops pretraining if ``stop``."""

    name = "earlybird"

    def __init__(self, ratio: float = 0.5, every: int = 0, keep: int = 5, threshold: float = 0.1,
                 stop: bool = False):
        if not 0 <= ratio < 1:
            raise ValueError(f"the Early-Bird pruning ratio must be in [0, 1) (got {ratio})")
        self.ratio, self.every, self.stop = ratio, every, stop
        self.rule = EarlyBirdRule(keep, threshold)
        self.fired_at: int | None = None
        self.checks: list[dict] = []

    def wants_model(self, loop, round_index: int, epoch_end: bool) -> bool:
        return (round_index + 1) % self.every == 0 if self.every > 0 else epoch_end

    def on_after_sync(self, loop, round_index: int, model) -> None:
        if model is None or not self.wants_model(loop, round_index, loop.is_epoch_end(round_index)):
            return
        emerged = self.rule.put(bn_channel_mask(model, self.ratio))
        full = len(self.rule.masks) == self.rule.keep
        self.checks.append({"round": round_index + 1, "dists": list(self.rule.dists) if full else None})
        if full:
            loop.logger.log({"earlybird/max_mask_distance": max(self.rule.dists)}, step=round_index + 1)
        if emerged and self.fired_at is None:
            self.fired_at = round_index + 1
            loop.ticket_found(self.name, {"ratio": self.ratio, "mask_distances": list(self.rule.dists)})
            if self.stop:
                loop.request_stop(f"Early-Bird masks within {self.rule.threshold} over {self.rule.keep} checks")

    def state_dict(self) -> dict:
        return {"masks": [m.tolist() for m in self.rule.masks], "dists": self.rule.dists,
                "fired_at": self.fired_at, "checks": self.checks}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.rule.masks = [torch.tensor(m, dtype=torch.bool) for m in state["masks"]]
            self.rule.dists = list(state["dists"])
            self.fired_at, self.checks = state["fired_at"], list(state["checks"])
