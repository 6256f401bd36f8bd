"""Dependency-free export of a compact ticket (``--export``).

``ticket.pt2`` is the compact model as a ``torch.export`` program (eval mode, fp32, a dynamic batch
dimension): it loads with ``torch.export.load("ticket.pt2").module()`` in a Python that has torch and
nothing else (no loft_ext, no timm). ``reference.pt`` holds an input and the compact model's output
for it (a dict of tensors, ``torch.load(..., weights_only=True)``), so whoever loads the program can
check it. With ``pt2+onnx`` the same program is also written as ``ticket.onnx`` (``torch.onnx``'s
dynamo exporter; needs the ``onnx`` extra: ``pip install 'loft_ext[onnx]'``) and checked with
onnxruntime. ``deploy.json`` records the files, the input shape and the measured differences.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from loft_ext.errors import ConfigError

EXPORTS = ("pt2", "pt2+onnx", "none")
MAX_BATCH = 4096


class ExportError(ConfigError):
    """An export format that cannot be written here (e.g. ONNX without its packages)."""


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (eval mode) as a torch.export program whose batch dimension is dynamic."""
    model.eval()
    if example.shape[0] < 2:  # a batch of 1 would be specialised to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """``model`` as ONNX (dynamo exporter, dynamic batch)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("--export pt2+onnx needs the onnx packages: pip install 'loft_ext[onnx]' "
                          "(or use --export pt2)") from None
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    model.eval()
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["input"], output_names=["logits"], verbose=False)
    program.save(path)


def onnx_outputs(path: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``path`` with onnxruntime (CPU) on ``x``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking the ONNX export needs onnxruntime: pip install 'loft_ext[onnx]'") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def check_export(fmt: str) -> None:
    if fmt not in EXPORTS:
        raise ExportError(f"unknown --export {fmt!r}; choose one of {', '.join(EXPORTS)}")
    if fmt == "pt2+onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError("--export pt2+onnx needs the onnx packages: pip install 'loft_ext[onnx]' "
                              "(or use --export pt2)") from None


@torch.no_grad()
def save_deployable(folder: str, model: nn.Module, input_shape: tuple[int, ...], fmt: str = "pt2",
                    seed: int = 0) -> dict:
    """Write ``ticket.pt2`` (and ``ticket.onnx``), ``reference.pt`` and ``deploy.json`` under ``folder``;
    each export is reloaded and compared with ``model`` on the reference input. Returns the record."""
    check_export(fmt)
    if fmt == "none":
        return {}
    os.makedirs(folder, exist_ok=True)
    model = model.eval().cpu()
    x = torch.randn((4, *input_shape[1:]), generator=torch.Generator().manual_seed(seed))
    reference = model(x)
    torch.save({"input": x, "output": reference}, os.path.join(folder, "reference.pt"))
    record = {"format": fmt, "input_shape": [None, *input_shape[1:]], "reference": "reference.pt",
              "files": {}, "max_abs_diff": {}, "load": "torch.export.load('ticket.pt2').module()(x)"}
    program = export_program(model, x)
    path = os.path.join(folder, "ticket.pt2")
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    record["files"]["pt2"] = "ticket.pt2"
    record["max_abs_diff"]["pt2"] = float((loaded(x) - reference).abs().max())
    if fmt == "pt2+onnx":
        path = os.path.join(folder, "ticket.onnx")
        export_onnx(model, x, path)
        record["files"]["onnx"] = "ticket.onnx"
        record["max_abs_diff"]["onnx"] = float((onnx_outputs(path, x) - reference).abs().max())
    with open(os.path.join(folder, "deploy.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record
