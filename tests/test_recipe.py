"""recipes/loft_timm.py end to end: output, run directory, refusal of bad input."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "loft_timm.py")

SMALL = ["--rounds", "6", "--local_steps", "3", "--batch_size", "32", "--bn_recalibration_batches", "2",
         "--ratios", ""]


def _run(args, tmp_path):
    return subprocess.run([sys.executable, RECIPE, *args, "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_recipe_trains_prints_and_never_overwrites(tmp_path):
    proc = _run(SMALL, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 1  # 44 steps/epoch at batch 32 -> 15 rounds/epoch: the only epoch line is round 6 (last)
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    lock = tmp_path / f".{run_dir.name}.lock"
    assert not lock.exists()  # held beside the run while it trained, removed at its end
    assert {"hparams.json", "plan.json", "metrics.jsonl", "summary.json", "init.safetensors",
            "model.safetensors"} <= set(os.listdir(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["round"] == 6 and len(summary["worker_loss"]) == 2
    assert summary["test_acc"] > 0.3  # 10 classes: chance is 0.1
    # the same run again does not train over the finished one
    again = _run(SMALL, tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout
    # a launch while another process trains the same run directory is refused, even with --force (which
    # would rename the directory under the other process), and nothing is moved
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom loft_ext.engine.setup import lock_run\n"
                               "lock_run(sys.argv[1], sys.argv[2]); print('held', flush=True); time.sleep(600)",
                               str(tmp_path), run_dir.name], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = _run(SMALL + ["--force"], tmp_path)
        assert busy.returncode == 2 and busy.stderr.count("\n") == 1, busy.stderr[-2000:]
        assert f"another process (pid {holder.pid} on " in busy.stderr and "--resume latest" in busy.stderr
        assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [run_dir.name]
        assert lock.read_text().startswith(f"pid {holder.pid} on ")  # the refused launch leaves the holder's lock
    finally:
        holder.kill()
        holder.wait()
    # a run directory whose stored plan splits other groups (a preset's rule or timm's graph changed since) is
    # not taken for this run's: one line naming both plans' differences and the fix
    plan_path = run_dir / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["split"][0]["name"] = "conv_renamed"
    plan_path.write_text(json.dumps(plan))
    other = _run(SMALL, tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr[-2000:]
    assert "another partition plan" in other.stderr and "split there only: conv_renamed" in other.stderr
    assert "--force" in other.stderr and (run_dir / "summary.json").exists()
    forced = _run(SMALL + ["--force"], tmp_path)
    assert forced.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [run_dir.name, run_dir.name + ".old-1"]


def test_help_lists_every_flag():
    proc = subprocess.run([sys.executable, RECIPE, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for flag in ("--model", "--preset", "--workers", "--local_steps", "--optimizer_state", "--data_order",
                 "--dataset", "--data_dir", "--epochs", "--rounds", "--lr_milestones", "--seed", "--output_dir"):
        assert flag in proc.stdout


def test_docs_usage_lists_every_flag():
    import argparse

    from loft_ext.engine.pipeline import ALL_HPARAMS

    parser = argparse.ArgumentParser()
    for cls in ALL_HPARAMS:
        cls.add_args(parser)
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 50
    assert [f for f in flags if f"`{f}`" not in usage] == []


def test_run_hash_is_stable_and_a_field_added_later_keeps_earlier_runs_at_its_legacy_value():
    """Run directories are named by hparams_hash: pinned here so that a change to the hashing (or to a default)
    cannot silently orphan stored runs. A field added later with ``legacy=`` is left out of the hash at that
    value and counts at any other."""
    import dataclasses

    from loft_ext.engine.config import LoftHparams, ModelHparams
    from loft_ext.hparams import field, hparams_hash

    assert hparams_hash(ModelHparams(), LoftHparams()) == PINNED_HASH, (
        "the default run's hash changed: give a new field legacy=<the old behaviour>, or, for a deliberate "
        "change of a default (which orphans stored runs), update PINNED_HASH")

    @dataclasses.dataclass
    class LoftHparams(LoftHparams):  # the same class name, as if a field had been added to it
        momentum_warmup: int = field(0, "a field added later", legacy=0)

    assert hparams_hash(ModelHparams(), LoftHparams()) == PINNED_HASH
    assert hparams_hash(ModelHparams(), LoftHparams(momentum_warmup=3)) != PINNED_HASH
    # the runs of the previous default are reached by naming it (docs/usage.md, --preset)
    assert hparams_hash(ModelHparams(preset="one_dim"), LoftHparams()) == "ade4fb6f66ca"


PINNED_HASH = "334ee7fe371d"  # hparams_hash(ModelHparams(), LoftHparams()) since preset one_dim_flops, 2026-12-07
# (ade4fb6f66ca from 2026-12-06: --preset one_dim gives it again, so those runs are found and resumed)
