"""Snapshots of the assembled model during pretraining (the rewinding point of lottery-ticket training)."""
from __future__ import annotations

import torch

from .base import Plugin


class SaveWeights(Plugin):
    """Saves the assembled model after round k (the rewinding point of lottery-ticket training)."""

    name = "save_weights"

    def __init__(self, round_number: int, path: str, main: bool):
        self.round_number, self.path, self.main = round_number, path, main

    def wants_model(self, loop, round_index, epoch_end):
        return round_index + 1 == self.round_number

    def on_after_sync(self, loop, round_index, model):
        if model is not None and self.main and round_index + 1 == self.round_number:
            save_weights(model, self.path)


def save_weights(model: torch.nn.Module, path: str) -> None:
    """A state_dict as safetensors (loading it never executes pickled code)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)
