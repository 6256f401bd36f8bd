"""Residual-stream pruning (--prune_scope hidden+stream) and the dependency-free export (--export)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from loft_ext.partition.plan import make_plan
from loft_ext.partition.subnet import tensors_of
from loft_ext.tickets.deploy import save_deployable
from loft_ext.tickets.export import compact_model
from loft_ext.tickets.masks import MaskEnforcer
from loft_ext.tickets.prune import structured_ticket, unit_scores
from loft_ext.tickets.stream import group_scores, stream_groups, with_streams

from conftest import randomise_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resnet18_streams_couple_every_block_downsample_norm_and_head(model_cache):
    model = model_cache("resnet18")
    streams = stream_groups(model, (1, 3, 32, 32))
    assert [g.channels for g in streams] == [64, 128, 256, 512]
    dims = {(d.name, d.dim, d.role) for d in streams[1].dims}
    for block in ("layer2.0", "layer2.1"):  # both blocks add into the layer2 stream: conv2 rows, bn2
        assert (f"{block}.conv2.weight", 0, "producer") in dims and (f"{block}.bn2.weight", 0, "norm") in dims
    assert ("layer2.0.downsample.0.weight", 0, "producer") in dims  # downsample conv and its norm
    assert ("layer2.0.downsample.1.running_var", 0, "norm") in dims
    assert ("layer2.1.conv1.weight", 1, "consumer") in dims and ("layer3.0.downsample.0.weight", 1, "consumer") in dims
    assert ("conv1.weight", 0, "producer") in {(d.name, d.dim, d.role) for d in streams[0].dims}  # stem
    assert ("fc.weight", 1, "consumer") in {(d.name, d.dim, d.role) for d in streams[3].dims}  # head
    # the group score sums every coupled tensor, each normalised by its mean
    g = streams[3]
    want = sum((lambda s: s / s.mean().clamp_min(1e-30))(dict(model.named_parameters())[d.name].detach().double()
                                        .movedim(d.dim, 0).reshape(d.size, -1).pow(2).sum(1)) for d in g.dims if not d.buffer)
    torch.testing.assert_close(group_scores(model, g, "l2"), want.sqrt())
    plan = make_plan(model, 1, "all", (1, 3, 32, 32), "resnet18")
    ticket = structured_ticket(model, plan, 0.5, "hidden+stream")
    for grp, kept, score in zip(ticket.plan.split, ticket.kept, unit_scores(model, ticket.plan, "l2")):
        assert len(kept) == round(0.5 * grp.units)
        dropped = torch.ones(grp.units, dtype=torch.bool)
        dropped[kept] = False
        assert score[kept].min() >= score[dropped].max()
    assert [g.kind for g in ticket.plan.split].count("stream") == 4


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 32), ("efficientnet_b0", 32),
                                       ("regnetx_002", 32)])
def test_stream_compact_equals_masked(model_cache, name, size):
    model = randomise_bn(copy.deepcopy(model_cache(name))).eval()
    shape = (1, 3, size, size)
    plan = make_plan(model, 1, "all", shape, name)
    hidden = compact_model(model, structured_ticket(model, plan, 0.5))
    ticket = structured_ticket(model, plan, 0.5, "hidden+stream")
    assert any(g.kind == "stream" for g in ticket.plan.split)
    masked = copy.deepcopy(model)
    MaskEnforcer(masked, ticket.masks(masked)).apply()
    small = compact_model(model, ticket).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = masked(x)
        assert want.abs().max() > 1e-3  # not a trivially small output
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)
    n_small, n_hidden = (sum(p.numel() for p in m.parameters()) for m in (small, hidden))
    assert n_small < n_hidden < sum(p.numel() for p in model.parameters())  # streams shrink it further
    stream_tensors = {d.name for g in ticket.plan.split if g.kind == "stream" for d in g.dims}
    small_t = tensors_of(small)
    assert all(small_t[n].shape != t.shape for n, t in tensors_of(model).items() if n in stream_tensors)


def test_stream_masks_never_regrow_in_finetuning(model_cache):
    from accelerate import Accelerator

    from loft_ext.tickets.finetune import finetune

    model = copy.deepcopy(model_cache("resnet18", num_classes=10, in_chans=1))
    plan = with_streams(model, make_plan(model, 1, "all", (1, 1, 32, 32), "resnet18"))
    ticket = structured_ticket(model, plan, 0.8, "hidden+stream")
    masks = ticket.masks(model)
    assert any(n.startswith("layer4.1.bn2.running") for n in masks)  # buffers of the stream norms too
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    finetune(model, masks, data, data, Accelerator(cpu=True), epochs=2, lr=0.1, batch_size=16, optimizer="sgd")
    tensors = tensors_of(model)
    for n, m in masks.items():
        assert (tensors[n][~m] == 0).all(), n
        assert tensors[n][m].abs().sum() > 0 or n.endswith("bias"), n


_LOAD_WITHOUT_LOFT = r"""
import sys
sys.modules["loft_ext"] = None  # any import of loft_ext (or timm) would now fail
sys.modules["timm"] = None
import json, torch
folder = sys.argv[1]
ref = torch.load(folder + "/reference.pt", weights_only=True)
program = torch.export.load(folder + "/ticket.pt2").module()
with torch.no_grad():
    out = {"pt2": (program(ref["input"]) - ref["output"]).abs().max().item(),
           "pt2_batch1": (program(ref["input"][:1]) - ref["output"][:1]).abs().max().item()}
if len(sys.argv) > 2:
    import onnxruntime as ort
    session = ort.InferenceSession(folder + "/ticket.onnx", providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: ref["input"].numpy()})
    out["onnx"] = (torch.from_numpy(y) - ref["output"]).abs().max().item()
out["scale"] = ref["output"].abs().max().item()
out["loft_ext"] = any(k.startswith("loft_ext") and sys.modules[k] is not None for k in sys.modules)
print(json.dumps(out))
"""


def test_exported_ticket_loads_without_loft_ext(model_cache, tmp_path):
    """ticket.pt2 (and ticket.onnx where the onnx extra is installed) in a Python that cannot import loft_ext."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        fmt = "pt2+onnx"
    except ImportError:
        fmt = "pt2"
    model = randomise_bn(copy.deepcopy(model_cache("resnet18"))).eval()
    plan = make_plan(model, 1, "all", (1, 3, 32, 32), "resnet18")
    ticket = structured_ticket(model, plan, 0.8, "hidden+stream")
    masked = copy.deepcopy(model)
    MaskEnforcer(masked, ticket.masks(masked)).apply()
    record = save_deployable(str(tmp_path), compact_model(model, ticket), (1, 3, 32, 32), fmt)
    assert json.loads((tmp_path / "deploy.json").read_text()) == record
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    with torch.no_grad():  # the reference is the masked ticket's output
        torch.testing.assert_close(ref["output"], masked(ref["input"]), rtol=1e-5, atol=1e-5)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_LOFT, str(tmp_path), *(["onnx"] if "onnx" in fmt else [])],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loft_ext"] is False and out["scale"] > 1e-3
    for key in ("pt2", "pt2_batch1") + (("onnx",) if "onnx" in fmt else ()):
        assert out[key] <= 1e-5 * max(1.0, out["scale"]), (key, out)


@pytest.mark.slow
def test_pipeline_stream_ticket_with_export(tmp_path):
    recipe = os.path.join(ROOT, "recipes", "loft_timm.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, recipe, "--method", "dense", "--rounds", "2", "--local_steps", "2",
                           "--batch_size", "32", "--bn_recalibration_batches", "1", "--finetune_epochs", "1",
                           "--finetune_batch_size", "128", "--ratios", "0.8", "--preset", "all",
                           "--prune_scope", "hidden+stream", "--export", "pt2", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (row,) = json.loads((run_dir / "summary.json").read_text())["ticket_rows"]
    assert row["scope"] == "hidden+stream" and row["flop_ratio"] > 10 and row["speedup"] > 0
    assert row["export"]["pt2"] <= 1e-5
    tdir = run_dir / os.path.relpath(row["dir"], str(run_dir))
    assert (tdir / "deploy" / "ticket.pt2").is_file() and (tdir / "deploy" / "reference.pt").is_file()
    header = [line for line in proc.stdout.splitlines() if "test acc" in line][-1]
    assert "scope" in header and "speed-up" in header and "GFLOPs" in header
    assert "hidden+stream" in proc.stdout.splitlines()[-1]


def test_bad_stream_and_export_flags_are_one_line_config_errors():
    from loft_ext.engine.pipeline import TicketHparams, validate_tickets
    from loft_ext.errors import ConfigError
    from loft_ext.tickets.deploy import check_export

    with pytest.raises(ConfigError, match=r"--prune_scope hidden\+stream is for --ticket structured"):
        validate_tickets(TicketHparams(ticket="unstructured", prune_scope="hidden+stream"))
    with pytest.raises(ConfigError, match="unknown --export 'tflite'; choose one of pt2, pt2\\+onnx, none"):
        check_export("tflite")
    validate_tickets(TicketHparams(prune_scope="hidden+stream", export="pt2"))
