"""Bad input: one clear ``error:`` line naming the problem and a fix, exit status 2, before any
training, and the results already in the output directory untouched (docs/reliability.md)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from loft_ext.engine.setup import check_mixed_precision
from loft_ext.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")
sys.path.insert(0, os.path.join(ROOT, "recipes"))

from loft_timm import main  # noqa: E402

TINY = ["--rounds", "2", "--local_steps", "1", "--batch_size", "32", "--ratios", "", "--image_size", "16",
        "--bn_recalibration_batches", "1"]


def _snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An output directory holding one finished run whose checkpoints exist (the results to protect)."""
    out = tmp_path_factory.mktemp("finished")
    assert main([*TINY, "--checkpoint_every", "1", "--keep_checkpoints", "1", "--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def previous(tmp_path, finished):
    out = tmp_path / "runs"
    shutil.copytree(finished, out)
    return out


def _checkpoint(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run / "checkpoints" / "round_000001"


def _config(tmp_path, **changes):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "zero0_fp32_cpu.json")))
    cfg.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _corrupt(out):
    ckpt = _checkpoint(out)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    return [str(ckpt)]


def _truncate(out):
    ckpt = _checkpoint(out)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [str(ckpt)]


def _imagefolder(tmp, per_class=2, size=8):
    from conftest import write_noise_imagefolder
    return write_noise_imagefolder(tmp / "images", per_class=per_class, size=size)


def _class_only_in_val(out, tmp):
    root = _imagefolder(tmp)
    (root / "val" / "c").mkdir()
    (root / "val" / "c" / "0.png").write_bytes((root / "val" / "a" / "0.png").read_bytes())
    return ["--data_dir", str(root)]


def _empty_class_folder(out, tmp):
    root = _imagefolder(tmp)
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    return ["--data_dir", str(root)]


def _no_class_folders(out, tmp):
    for split in ("train", "val"):
        (tmp / "images" / split).mkdir(parents=True)
    return ["--data_dir", str(tmp / "images")]


def _unreadable_images(out, tmp):
    root = _imagefolder(tmp)
    png = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "a" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "val" / "b" / "notes.jpg").write_text("not an image")
    return ["--data_dir", str(root)]


def _corrupt_inside(png: bytes) -> bytes:
    """A PNG whose signature and end marker are intact but whose pixel data is garbage: the header scan
    passes it, decoding fails (a file damaged after the scan behaves the same)."""
    start = png.index(b"IDAT") + 8
    return png[:start] + bytes(b ^ 0x5A for b in png[start:start + 40]) + png[start + 40:]


IMAGEFOLDER = ["--dataset", "imagefolder"]

# (flags, the message, optional setup(out, tmp_path) -> extra flags)
CASES = {
    "unknown_model": (["--model", "resnet18x"], "unknown timm model 'resnet18x'; did you mean", None),
    "nothing_to_split": (["--model", "vit_tiny_patch16_224", "--image_size", "224", "--rounds", "1"],
                         "nothing in vit_tiny_patch16_224 can be split", None),
    "input_size_the_model_refuses": (["--model", "vit_tiny_patch16_224"],
                                     "does not run on an input of shape (1, 1, 16, 16)", None),
    "earlybird_without_batchnorm": (["--model", "resnetv2_50x1_bit", "--method", "earlybird"],
                                    "Early-Bird ranks BatchNorm2d scales and resnetv2_50x1_bit has none", None),
    "workers_below_one": (["--workers", "0"], "--workers must be >= 1", None),
    "workers_wider_than_every_group": (["--workers", "100000", "--preset", "all"], "fewer than S=100000", None),
    "local_steps_below_one": (["--local_steps", "0"], "--local_steps must be >= 1", None),
    "negative_rounds": (["--rounds", "-1"], "--rounds must be >= 0", None),
    "negative_data_workers": (["--data_workers", "-1"], "--data_workers must be >= 0", None),
    "finetune_batch_larger_than_the_data": (["--ratios", "0.5", "--finetune_batch_size", "5000"],
                                            "fewer than one fine-tuning batch of --finetune_batch_size 5000", None),
    "ratio_of_one": (["--ratios", "0.5,1.0"], "--ratios must lie in [0, 1)", None),
    "negative_ratio": (["--ratios", "-0.1"], "--ratios must lie in [0, 1)", None),
    "data_dir_missing": (["--dataset", "cifar10"], "needs --data_dir", None),
    "data_dir_does_not_exist": (["--dataset", "cifar10", "--data_dir", "/nonexistent"], "does not exist", None),
    "data_dir_malformed": (["--dataset", "fashion_mnist"], "does not hold FashionMNIST/raw/",
                           lambda out, tmp: ["--data_dir", str(tmp)]),
    "ds_config_missing": (["--deepspeed", "--deepspeed_config", "/nonexistent.json"], "does not exist", None),
    "ds_config_not_json": (["--deepspeed"], "is not valid JSON",
                           lambda out, tmp: (tmp / "bad.json").write_text("{oops") and
                           ["--deepspeed_config", str(tmp / "bad.json")]),
    "ds_config_batch_mismatch": (["--deepspeed"], "train_batch_size=33 is not train_micro_batch_size_per_gpu",
                                 lambda out, tmp: ["--deepspeed_config", _config(tmp, train_batch_size=33)]),
    "deepspeed_with_channels_last": (["--deepspeed", "--channels_last"],
                                     "--channels_last does not work with --deepspeed",
                                     lambda out, tmp: ["--deepspeed_config", _config(tmp)]),
    "ds_config_bf16_enabled": (["--deepspeed"], "bf16.enabled casts the worker's weights to bf16",
                               lambda out, tmp: ["--deepspeed_config", _config(tmp, bf16={"enabled": True})]),
    "resume_from_another_configuration": (["--workers", "4", "--preset", "all"],
                                          "was written with workers=2, this run has workers=4",
                                          lambda out, tmp: ["--resume", str(_checkpoint(out))]),
    "resume_from_corrupt_checkpoint": (["--seed", "1"], "is corrupt (sha256 differs from the manifest)",
                                       lambda out, tmp: ["--resume", *_corrupt(out)]),
    "resume_from_truncated_checkpoint": (["--seed", "1"], "is truncated or changed",
                                         lambda out, tmp: ["--resume", *_truncate(out)]),
    "resume_from_a_directory_that_is_no_checkpoint": (["--seed", "1", "--resume"], "has no manifest.json",
                                                      lambda out, tmp: [str(tmp)]),
    "wandb_online_without_credentials": (["--tracker", "wandb", "--wandb_mode", "online"],
                                         "W&B online mode needs credentials", None),
    "distance_window_in_negative_epochs": (["--distance_window_epochs", "-1"],
                                           "--distance_window_epochs must be >= 0", None),
    "distance_lr_below_above_one": (["--distance_lr_below", "1.5"], "--distance_lr_below must be in (0, 1]", None),
    "distance_lr_below_on_a_constant_lr": (["--distance_lr_below", "0.5", "--lr_schedule", "constant"],
                                           "the learning rate never falls", None),
    "distance_stop_without_distance": (["--distance_stop", "--distance_layers", "none"],
                                       "--distance_stop needs the filter distance", None),
    "earlybird_stop_without_earlybird": (["--earlybird_stop", "--earlybird", "false"],
                                         "--earlybird_stop needs the Early-Bird detector", None),
    "prune_levels_for_structured_tickets": (["--prune_levels", "2", "--ratios", "0.5"],
                                            "--prune_levels > 1 is for --ticket unstructured", None),
    "rewind_round_without_its_round": (["--rewind", "round", "--ratios", "0.5"],
                                       "--rewind round needs --rewind_round >= 1", None),
    "rewind_round_the_finished_pretraining_did_not_save": (
        ["--rewind", "round", "--rewind_round", "1", "--ratios", "0.5"],
        "round_1.safetensors is missing; the pretraining finished without saving those weights", None),
    "negative_oneshot_bn_batches": (["--oneshot_bn_batches", "-1", "--ratios", "0.5"],
                                    "--oneshot_bn_batches must be >= 0", None),
    "negative_lr": (["--lr", "-1"], "--lr must be > 0", None),
    "lr_milestones_outside_the_run": (["--lr_milestones", "0.5,2"], "--lr_milestones are fractions", None),
    "keep_no_checkpoints": (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1", None),
    "imagefolder_class_only_in_val": (IMAGEFOLDER, "the class folders of train/ and val/ differ (only in train/: "
                                      "none; only in val/: c)", _class_only_in_val),
    "imagefolder_empty_class_folder": (IMAGEFOLDER, "class folder(s) with no image files", _empty_class_folder),
    "imagefolder_without_class_folders": (IMAGEFOLDER, "holds no class folders", _no_class_folders),
    "imagefolder_unreadable_images": (IMAGEFOLDER, "2 of 10 image files under", _unreadable_images),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_and_prior_results_survive(case, previous, tmp_path, capsys, monkeypatch):
    flags, message, setup = CASES[case]
    if case == "wandb_online_without_credentials":
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        monkeypatch.setenv("HOME", str(tmp_path))
    extra = setup(previous, tmp_path) if setup else []
    before = _snapshot(previous)
    assert main([*TINY, *flags, *extra, "--output_dir", str(previous)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1  # one line
    assert _snapshot(previous) == before  # nothing written, nothing overwritten


def test_unfinished_run_with_checkpoints_is_not_restarted_over(previous, capsys):
    (run,) = [p for p in previous.iterdir() if p.is_dir()]
    (run / "summary.json").unlink()  # the run died after its checkpoint of round 1
    before = _snapshot(previous)
    assert main([*TINY, "--output_dir", str(previous)]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an unfinished run (up to round_000001); pass --resume latest" in err
    assert _snapshot(previous) == before


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*TINY, "--output_dir", str(blocker / "runs")]) == 2
    assert "pass a writable --output_dir" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys):
    """The run lock (a file beside the run directory, engine/setup.py) is taken before the run directory is
    read; a run refused after it removes the lock file and the output directories made for it."""
    assert main([*TINY, "--resume", str(tmp_path), "--output_dir", str(tmp_path / "new" / "runs")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bf16_on_a_gpu_without_bf16_is_refused():
    with pytest.raises(ConfigError, match="--mixed_precision bf16 needs a GPU with bf16 support"):
        check_mixed_precision("bf16", "cuda", bf16_supported=False)
    check_mixed_precision("bf16", "cpu")  # torch's CPU autocast has bf16
    check_mixed_precision("no", "cuda", bf16_supported=False)


@pytest.mark.slow
def test_world_size_not_a_multiple_of_workers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                           "--nproc_per_node", "2", RECIPE, *TINY, "--workers", "3", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "error: world size 2 is not a multiple of S=3 filter workers: launch 3, 6, 9, 12, ... processes" \
        in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_rendezvous_port_in_use_is_one_clear_error(tmp_path):
    """What the deepspeed launcher's rank 0 meets when another run holds its port (seen in CI): one line that
    names the port and the launchers' port flags, not a DistNetworkError traceback."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "RANK": "0",
               "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, RECIPE, *TINY, "--output_dir", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: the rendezvous port {port} is already in use (another run or launcher holds it): pick a free one "
        "with `torchrun --master_port N` (or `--standalone`), `accelerate launch --main_process_port N` or "
        "`deepspeed --master_port N`"]


def test_unreadable_image_list_names_every_file(tmp_path):
    from loft_ext.data import DataError, load_dataset

    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", _unreadable_images(None, tmp_path)[1], 8)
    assert "train/a/truncated.png (OSError: image file is truncated)" in str(info.value)
    assert "val/b/notes.jpg (UnidentifiedImageError" in str(info.value)


def test_bad_images_skip_and_a_file_that_breaks_mid_run_is_replaced(tmp_path, capsys):
    """--bad_images skip leaves out what the scan finds; a file the scan passes but that cannot be decoded
    is replaced by another sample at every draw (in the loader process too), and the run finishes."""
    root = _imagefolder(tmp_path, per_class=8, size=16)
    png = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "a" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "train" / "b" / "damaged.png").write_bytes(_corrupt_inside(png))
    flags = [*TINY, *IMAGEFOLDER, "--data_dir", str(root), "--batch_size", "8", "--rounds", "3",
             "--local_steps", "2", "--data_workers", "1", "--bad_images", "skip", "--output_dir", str(tmp_path / "o")]
    assert main(flags) == 0
    (run,) = [p for p in (tmp_path / "o").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images_skipped"] == 1 and summary["rounds_done"] == 3
    # 17 training files, 16 steps x 8 samples over 2 workers: each worker's first epoch draws damaged.png
    assert summary["samples_replaced"] >= 2
    err = capsys.readouterr().err
    assert "warning: cannot read" in err and "damaged.png" in err


def test_too_many_unreadable_images_mid_run_end_it_with_one_line(tmp_path, capsys):
    root = _imagefolder(tmp_path, per_class=8, size=16)
    png = (root / "train" / "a" / "0.png").read_bytes()
    for i in range(11):  # the scan passes them; more than 10 (1% of the set, at least 10) fail to decode
        (root / "train" / ("a", "b")[i % 2] / f"damaged{i}.png").write_bytes(_corrupt_inside(png))
    flags = [*TINY, *IMAGEFOLDER, "--data_dir", str(root), "--batch_size", "8", "--output_dir", str(tmp_path / "o")]
    assert main(flags) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: more than 10 training images could not be read during the run"), last
    assert "Last good checkpoint: none" in last


def test_finetune_epochs_zero_reports_the_untrained_tickets_accuracy(previous, capsys):
    """--finetune_epochs 0: the ticket is evaluated as pruned (its one-shot accuracy), not trained."""
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from loft_ext.data import load_dataset
    from loft_ext.evaluation import evaluate
    from loft_ext.models import create_model

    data = load_dataset("digits", image_size=16)
    (run,) = [p for p in previous.iterdir() if p.is_dir()]
    pretrained = load_file(str(run / "model.safetensors"))
    for bn_batches in (0, 2):  # the pretrained BatchNorm statistics, then re-estimated ones
        assert main([*TINY, "--ratios", "0.5", "--finetune_epochs", "0", "--oneshot_bn_batches", str(bn_batches),
                     "--finetune_batch_size", "32", "--output_dir", str(previous)]) == 0
        assert "one-shot (not fine-tuned): test acc" in capsys.readouterr().out
        row = json.loads((run / "summary.json").read_text())["ticket_rows"][-1]
        assert row["finetune_bytes"] == 0 and row["total_bytes"] == row["pretrain_bytes"]
        tdir = run / os.path.relpath(row["dir"], str(run))
        masks = load_file(str(tdir / "masks.safetensors"))
        ticket = load_file(str(tdir / "finetuned.safetensors"))
        running = [n for n in ticket if n.endswith(("running_mean", "running_var"))]
        expected = {n: pretrained[n] * masks[n] if n in masks else pretrained[n] for n in ticket}
        for name, w in ticket.items():  # the pretrained weights, pruned; only the BN statistics may change
            if not (bn_batches and name in running):
                assert torch.equal(w, expected[name]), name
        changed = sum(not torch.equal(ticket[n], expected[n]) for n in running)
        assert changed == (len(running) if bn_batches else 0)
        model = create_model("resnet18", 10, 1)
        model.load_state_dict(ticket)
        assert row["test_acc"] == evaluate(model, DataLoader(data.test, batch_size=256))["test_acc"]


def test_an_unexpected_error_is_one_line_naming_its_traceback_file(tmp_path, capsys):
    from loft_ext.errors import report_failure

    try:
        {}["test_acc"]  # what --finetune_epochs 0 used to end in
    except KeyError as exc:
        status = report_failure(exc, str(tmp_path))
    assert status == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unexpected KeyError: 'test_acc'; traceback in ")
    path = err.strip().rsplit("traceback in ", 1)[1]
    assert os.path.dirname(path) == str(tmp_path / "errors") and path.endswith("-rank0.log")
    text = open(path).read()
    assert text.startswith("Traceback (most recent call last):") and "KeyError: 'test_acc'" in text
