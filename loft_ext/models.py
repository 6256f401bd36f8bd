"""timm model creation for loft_ext: never downloads weights, names the fix for a bad name."""
from __future__ import annotations

import difflib

import timm
import torch.nn as nn

from loft_ext.errors import ConfigError


class ModelError(ConfigError):
    """An unknown or unusable model name."""


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` with a clear error for unknown names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}{hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def default_input_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(1, C, H, W) from the timm model's pretrained_cfg input size and its stem's input channels."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
    return (1, chans, *size)
