"""loft_ext as a library: the public API, the LoFT helper in a user's own loop, plugins a user writes or
installs, ticket plugins, and recipes/custom_loop.py (docs/library.md)."""
import copy
import difflib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import loft_ext
from conftest import launcher
from loft_ext.data import BatchStream, load_digits_dataset
from loft_ext.partition.subnet import read_slice, write_slice
from loft_ext.plugins.registry import PluginNotFound

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1"}
HELPER_LOOP = os.path.join(ROOT, "tests", "helper_loop.py")
SHAPE = (1, 1, 32, 32)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(32)


def _loft(base, workers=2, local_steps=2, plugins=(), **config):
    model = copy.deepcopy(base)
    return loft_ext.LoFT(None, model, loft_ext.LoFTConfig(workers, local_steps, **config), plugins=plugins,
                         input_shape=SHAPE)


def _train(loft, optimizers, streams, steps):
    for _ in range(steps):
        losses = []
        for index, module, opt in zip(loft.worker_indices, loft.models, optimizers):
            loss = F.cross_entropy(module(streams[index].next()[0]), streams[index].last_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss)
        loft.step(losses)


class _Stream(BatchStream):
    def next(self):
        x, self.last_y = super().next()
        return x, self.last_y


def _streams(data, workers, seed=0):
    return {i: _Stream(data.train, 32, i, workers, "own-shuffle", seed) for i in range(workers)}


# ------------------------------------------------------------------------------------------ the API
def test_public_api_exports_every_name_and_one_error_base():
    for name in loft_ext.__all__:
        assert hasattr(loft_ext, name), name
    from loft_ext.checkpoint import CheckpointError
    from loft_ext.data import DataError
    from loft_ext.models import ModelError
    from loft_ext.parallel.ds import DeepSpeedConfigError
    from loft_ext.parallel.grid import GridError
    from loft_ext.partition.graph import PartitionError
    from loft_ext.tickets.prune import PruneError
    from loft_ext.tracking import TrackingError
    for cls in (CheckpointError, DataError, ModelError, DeepSpeedConfigError, GridError, PartitionError,
                PruneError, TrackingError, PluginNotFound, loft_ext.ConfigError, loft_ext.TrainingFailure,
                loft_ext.PluginError, loft_ext.Preempted):
        assert issubclass(cls, loft_ext.LoftError), cls


def test_helper_refuses_misuse_with_one_clear_error(model_cache):
    base = model_cache("resnet18", 10, 1)
    loft = _loft(base)
    with pytest.raises(loft_ext.ConfigError, match="loft.models"):
        loft.model  # two simulated workers: which one would it be?
    with pytest.raises(loft_ext.ConfigError, match="sub-network"):
        loft.attach(*[torch.optim.SGD(base.parameters(), lr=0.1) for _ in loft.models])
    with pytest.raises(loft_ext.ConfigError, match="Plugin"):
        _loft(base, plugins=[object()])
    with pytest.raises(loft_ext.ConfigError, match="local_steps"):
        _loft(base, local_steps=0)
    with pytest.raises(PluginNotFound, match="earlybird"):
        loft_ext.create_plugin("no_such_plugin")


def test_s1_helper_equals_plain_training(model_cache, digits):
    base = model_cache("resnet18", 10, 1)
    plain = copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    stream = _Stream(digits.train, 32, 0, 1, "own-shuffle", 0)
    for _ in range(6):
        x, y = stream.next()
        loss = F.cross_entropy(plain(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loft = _loft(base, workers=1, local_steps=3, optimizer_state="carry")
    opts = [torch.optim.SGD(loft.model.parameters(), lr=0.05, momentum=0.9)]
    loft.attach(*opts)
    _train(loft, opts, _streams(digits, 1), 6)
    with loft.full_model() as full:
        for (name, a), b in zip(plain.state_dict().items(), full.state_dict().values()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["carry", "reset"])
def test_adamw_state_is_sliced_and_written_back_exactly(model_cache, digits, mode):
    base = model_cache("resnet18", 10, 1)
    captured = {}

    class Capture(loft_ext.Plugin):
        name = "capture"

        def on_before_sync(self, run, round_index):
            captured["part"] = run.engine.partition
            captured["states"] = [{p: {k: v.clone() for k, v in w.optimizer.state[p].items()}
                                   for p in w.optimizer.state} for w in run.engine.workers]

    loft = _loft(base, optimizer_state=mode, plugins=[Capture()])
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01) for m in loft.models]
    loft.attach(*opts)
    streams = _streams(digits, 2)
    _train(loft, opts, streams, 2)  # one full round: write-back, sync, next round loaded
    workers = loft.engine.workers
    split_name = next(n for n in loft.plan.tensor_dims if n.endswith("conv1.weight"))
    shared_name = "conv1.weight"  # the stem: shared under preset paper
    if mode == "reset":
        assert all(len(w.optimizer.state) == 0 for w in workers)
        assert loft.engine.full_opt_state == {}
        return
    part, states = captured["part"], captured["states"]
    full = loft.engine.full_opt_state
    for key in ("exp_avg", "exp_avg_sq"):
        want = torch.zeros_like(full[split_name][key])
        for w, st in zip(workers, states):
            write_slice(want, st[w.slicer.sub_tensors[split_name]][key], w.slicer.indices(part, split_name))
        assert torch.equal(full[split_name][key], want)
        shared = [st[w.slicer.sub_tensors[shared_name]][key] for w, st in zip(workers, states)]
        assert torch.equal(full[shared_name][key], (shared[0] + shared[1]) / 2)
        for w in workers:  # the next round's slices of it are loaded into every worker's AdamW
            got = w.optimizer.state[w.slicer.sub_tensors[split_name]][key]
            assert torch.equal(got, read_slice(full[split_name][key], w.slicer.indices(loft.engine.partition,
                                                                                        split_name)))
    assert float(full[split_name]["step"]) == 2.0


# ------------------------------------------------------------------------------------------ plugins
class Recorder(loft_ext.Plugin):
    name = "recorder"

    def __init__(self):
        self.events = []

    def __getattribute__(self, attr):
        if attr.startswith("on_"):
            events = object.__getattribute__(self, "events")
            return lambda run, *args: events.append(attr)
        return object.__getattribute__(self, attr)


def test_user_plugins_see_every_event_in_order_and_tickets_are_plugins(model_cache, digits):
    base = model_cache("resnet18", 10, 1)
    recorder = Recorder()
    drawer = loft_ext.TicketDrawer(ratio=0.5, at_rounds=(1,))
    loft = _loft(base, plugins=[drawer, recorder])
    loft.rounds, loft.rounds_per_epoch = 2, 1
    loft.attach(*[torch.optim.SGD(m.parameters(), lr=0.05) for m in loft.models], begin=False)
    loft_ext.fit(loft, _streams(digits, 2), torch.utils.data.DataLoader(digits.test, batch_size=360))
    round_events = ["on_round_start"] + ["on_local_step_end"] * 4 + ["on_before_sync", "on_after_sync"]
    tail = ["on_evaluation", "on_epoch_end", "on_round_end"]
    assert recorder.events == (["on_fit_start"] + round_events[:-1] + ["on_prune", "on_after_sync"] + tail
                               + round_events + tail + ["on_fit_end"])
    (ticket,) = drawer.tickets
    assert ticket["round"] == 1 and ticket["meta"]["kind"] == "structured"
    kept = sum(int(m.sum()) for m in ticket["masks"].values())
    assert 0 < kept < sum(m.numel() for m in ticket["masks"].values())

    # the masks, enforced in a user's own fine-tuning loop with AdamW: nothing regrows
    with loft.full_model() as full:
        model = copy.deepcopy(full)
    enforce = loft_ext.MaskEnforcement(model, ticket["masks"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    enforce.start()
    stream = _Stream(digits.train, 32, 0, 1, "own-shuffle", 0)
    for _ in range(3):
        x, y = stream.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        enforce.after_step(opt)
    enforce.stop()
    tensors = dict(model.named_parameters())
    for name, mask in ticket["masks"].items():
        if name in tensors:
            assert torch.count_nonzero(tensors[name].detach()[~mask]) == 0, name


def test_plugins_read_the_rounds_learning_rate_from_a_users_own_schedule(model_cache, digits):
    """A user's loop sets the lr in its own optimizers (no lr through begin_round): ``LoFT.lr`` reads it
    there, which is what DistanceStop(lr_below=...) gates on."""
    class LrSeen(loft_ext.Plugin):
        name = "lr_seen"

        def __init__(self):
            self.seen = []

        def on_after_sync(self, run, round_index, model):
            self.seen.append(run.lr)

    seen = LrSeen()
    loft = _loft(model_cache("resnet18", 10, 1), plugins=[seen])
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in loft.models]
    loft.attach(*opts)
    streams = _streams(digits, 2)
    _train(loft, opts, streams, 2)        # round 1 at lr 0.05
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = 0.025
    _train(loft, opts, streams, 2)        # round 2 at 0.025
    assert seen.seen == [0.05, 0.025]


def test_a_failing_plugin_stops_the_run_naming_plugin_and_event(model_cache, digits):
    class Broken(loft_ext.Plugin):
        name = "broken"

        def on_before_sync(self, run, round_index):
            raise ZeroDivisionError("division by zero")

    loft = _loft(model_cache("resnet18", 10, 1), plugins=[Broken()])
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in loft.models]
    loft.attach(*opts)
    with pytest.raises(loft_ext.PluginError, match=r"plugin 'broken' \(Broken\) failed in on_before_sync in "
                                                   r"round 1: ZeroDivisionError"):
        _train(loft, opts, _streams(digits, 2), 2)


def test_entry_point_and_registered_plugins_are_found(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "my_loft_plugins-0.1.dist-info").mkdir(parents=True)
    (pkg / "my_loft_plugins-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: my-loft-plugins\nVersion: 0.1\n")
    (pkg / "my_loft_plugins-0.1.dist-info" / "entry_points.txt").write_text(
        "[loft_ext.plugins]\nlr_logger = my_loft_plugins:LrLogger\n")
    (pkg / "my_loft_plugins.py").write_text(
        "import loft_ext\n\nclass LrLogger(loft_ext.Plugin):\n    name = 'lr_logger'\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert loft_ext.available_plugins()["lr_logger"] == "my_loft_plugins:LrLogger"
    plugin = loft_ext.create_plugin("lr_logger")
    assert type(plugin).__name__ == "LrLogger" and isinstance(plugin, loft_ext.Plugin)

    @loft_ext.register_plugin("mine")
    class Mine(loft_ext.Plugin):
        def __init__(self, k=1):
            self.k = k

    assert loft_ext.create_plugin("mine", k=3).k == 3
    assert isinstance(loft_ext.create_plugin("earlybird", ratio=0.3), loft_ext.EarlyBird)


# ------------------------------------------------------------------------------------------ processes
def _hashes(path):
    return [json.loads(x)["assembled"] for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_user_loop_equals_recipe_in_one_process_torchrun_and_accelerate_and_resumes(tmp_path):
    """One process (S simulated), torchrun and accelerate launch (one worker per process), the recipe,
    and a torchrun run saved mid-round with accelerator.save_state and resumed: the same model bit for bit."""
    common = ["--workers", "2", "--local_steps", "2", "--rounds", "4", "--batch_size", "32"]
    recipe = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "loft_timm.py"), *common, "--lr", "0.05",
                             "--lr_schedule", "constant", "--ratios", "", "--earlybird", "false", "--distance_layers",
                             "none", "--debug_hashes", "--tracker", "none", "--bn_recalibration_batches", "0",
                             "--output_dir", str(tmp_path / "recipe")], env=ENV, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert recipe.returncode == 0, recipe.stderr[-2000:]
    (run_dir,) = (tmp_path / "recipe").iterdir()
    want = [json.loads(x)["assembled"] for x in (run_dir / "hashes-rank0.jsonl").read_text().splitlines()
            if "assembled" in x]
    assert len(want) == 4

    runs = {
        "one": [[sys.executable, HELPER_LOOP]],
        "torchrun": [launcher("torchrun", 2) + [HELPER_LOOP, "--save_at", "5"],
                     launcher("torchrun", 2) + [HELPER_LOOP, "--resume",
                      str(tmp_path / "torchrun" / "state")]],
        "accelerate": [launcher("accelerate", 2) + [HELPER_LOOP]],
    }
    for name, commands in runs.items():
        for cmd in commands:
            proc = subprocess.run(cmd + common + ["--out", str(tmp_path / name)], env={**ENV, "ACCELERATE_USE_CPU": "1"},
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (name, proc.stderr[-3000:])
        final = json.loads((tmp_path / name / "final.json").read_text())
        assert final["world"] == (1 if name == "one" else 2), name
        for rank in range(final["world"]):
            assert _hashes(tmp_path / name / f"hashes-rank{rank}.jsonl") == want, (name, rank)
        assert final["hash"] == want[-1]
    assert (tmp_path / "torchrun" / "state" / "custom_checkpoint_0.pkl").exists()


# ------------------------------------------------------------------------------------------ custom_loop.py
def _plain_loop_from_docs() -> list[str]:
    text = open(os.path.join(ROOT, "docs", "library.md")).read()
    block = re.search(r"<!-- plain loop -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/library.md must show the plain loop in a ```python block after <!-- plain loop -->"
    return block.group(1).splitlines()


def test_custom_loop_adopts_loft_in_at_most_10_lines():
    custom = open(os.path.join(ROOT, "recipes", "custom_loop.py")).read().splitlines()
    plain = _plain_loop_from_docs()
    changed = [line for line in difflib.unified_diff(plain, custom, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    added = [line for line in changed if line.startswith("+")]
    assert 0 < len(added) <= 10, "\n".join(changed)
    assert all("# LoFT" in line for line in added), "\n".join(added)
    assert sum("# LoFT" in line for line in custom) == len(added)


@pytest.mark.slow
def test_custom_loop_reaches_the_recipe_accuracy_on_the_same_budget(tmp_path):
    """Digits under torchrun with 2 processes (S=2), the same samples per worker: the recipe's 3 epochs give every
    worker the whole set each epoch; the custom loop's prepared loader gives each process half of it, so 6
    epochs. The custom loop must come within 1 point of the recipe, or better."""
    out = tmp_path / "custom.json"
    proc = subprocess.run([*launcher("torchrun", 2), os.path.join(ROOT, "recipes", "custom_loop.py"), "--epochs", "6", "--output", str(out)],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    custom = json.loads(out.read_text())
    assert custom["world"] == 2
    recipe = subprocess.run([*launcher("torchrun", 2), os.path.join(ROOT, "recipes", "loft_timm.py"), "--epochs", "3", "--ratios", "",
                             "--tracker", "none", "--output_dir", str(tmp_path / "recipe")],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert recipe.returncode == 0, recipe.stderr[-3000:]
    (run_dir,) = (tmp_path / "recipe").iterdir()
    reference = json.loads((run_dir / "summary.json").read_text())["test_acc"]
    print(f"custom loop {100 * custom['test_acc']:.2f}% vs recipe {100 * reference:.2f}% on the same budget")
    assert custom["test_acc"] >= reference - 0.01


def test_recalibrate_bn_in_place_is_what_evaluate_does_on_a_copy():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = loft_ext.create_model("resnet10t", 10, 1)
    data = TensorDataset(torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,)))
    train, test = DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    on_copy = loft_ext.evaluate(model, test, recalibrate=train, recalibrate_batches=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # evaluate leaves it alone
    tuned = loft_ext.recalibrate_bn(copy.deepcopy(model), train, 3)
    assert loft_ext.evaluate(tuned, test) == on_copy
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


def test_a_user_checks_a_plan_on_their_own_model_through_the_public_api():
    """The exactness check a user runs on their model before training it with LoFT (docs/library.md)."""
    model = loft_ext.create_model("resnet10t", 10, 3)
    plan = loft_ext.make_plan(model, 2, "one_dim", (1, 3, 32, 32), "resnet10t")
    assert len(plan.split) == 5 and loft_ext.check_plan(model, plan) == []
