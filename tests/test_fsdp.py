"""FSDP2-sharded replicas (``--replicas fsdp``) on S=2 x D=2 gloo processes: one shared launch of
tests/fsdp_job.py; the recipe-level run is in test_distributed (same models as DDP replicas)."""
import json
import os
import subprocess

import pytest
from conftest import launcher

from loft_ext.errors import ConfigError
from loft_ext.parallel.replicas import check_replicas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = subprocess.run(launcher("torchrun", 4) + [os.path.join(ROOT, "tests", "fsdp_job.py"), str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
def test_the_mesh_holds_the_grids_ranks_in_both_orders(ranks):
    for r, result in enumerate(ranks):
        for order, mesh in result["mesh"].items():
            for mode, dim in (("fsdp", "shard"), ("ddp", "replica")):
                m = mesh[mode]
                assert m["names"] == ["filter", dim]
                assert m["filter_ranks"] == mesh["grid_filter_ranks"] and m["replica_ranks"] == mesh["grid_data_ranks"]
                assert r in m["filter_ranks"] and r in m["replica_ranks"]
                assert m["replica_sum"] == sum(mesh["grid_data_ranks"])  # the sub-mesh's group is real
                assert m["coordinate"] == mesh["coords"]  # this rank's (worker, replica)


@pytest.mark.slow
def test_fsdp_replicas_equal_ddp_replicas_with_half_the_state_and_sync_bytes(ranks):
    for result in ranks:
        # bit for bit, no tolerance: with D = 2 the reduce-scatter sums two gradients (order-free) and halves
        # them exactly; with S = 2 the sync's means are sums of two values, whatever the shard layout
        assert result["bit_identical"] and result["max_abs_diff"] == 0.0 and result["moved"] > 0.1
        assert result["tickets_identical"]
        ddp, fsdp = result["ddp"]["state_bytes"], result["fsdp"]["state_bytes"]
        for kind in ("params", "grads", "optimizer_state"):
            assert abs(fsdp[kind] / ddp[kind] - 0.5) <= 0.02 * 0.5, (kind, fsdp, ddp)
        assert result["fsdp"]["strategy"] == "ShardedAllGatherSync"
        for run in ("ddp", "fsdp"):  # every measured phase equals the analytic count
            measured, expected = result[run]["measured_phases"], result[run]["analytic_phases"]
            for phase, sent in expected.items():
                assert measured.get(phase, 0.0) == pytest.approx(sent, rel=1e-9), (run, phase)
        # the filter axis moves only this rank's shard: 1/D of the DDP replicas' sync (within 2%: shard padding,
        # BN statistics that FSDP does not shard); the D shards meet over the data group (shard_gather)
        ratio = result["fsdp"]["measured_phases"]["sync"] / result["ddp"]["measured_phases"]["sync"]
        assert abs(ratio - 0.5) <= 0.02 * 0.5, ratio
        assert result["fsdp"]["measured_phases"]["shard_gather"] > 0
        assert "shard_gather" not in result["ddp"]["measured_phases"]
        # a round-boundary resume from the assembled model alone (what the checkpoint holds) is bit for bit
        assert result["resume_bit_identical"]
        # --sync alltoall: bit for bit as well, the filter axis moves 1/D (within 2%), every phase = analytic
        assert result["alltoall_bit_identical"]
        a2a = result["alltoall"]
        assert a2a["fsdp"]["strategy"] == "ShardedAllToAllSync"
        for run in ("ddp", "fsdp"):
            for phase, sent in a2a[run]["analytic_phases"].items():
                assert a2a[run]["measured_phases"].get(phase, 0.0) == pytest.approx(sent, rel=1e-9), (run, phase)
        assert abs(a2a["fsdp"]["measured_phases"]["sync"] / a2a["ddp"]["measured_phases"]["sync"] - 0.5) <= 0.01
        # --optimizer_state carry: FSDP replicas shard the carried momentum and equal DDP replicas bit for bit
        # under both strategies; every measured phase equals the analytic count (momentum counted like its
        # parameter); the filter axis still moves 1/D; a resume from the saved state is exact
        for strategy, run in result["carry"].items():
            assert run["bit_identical"] and run["resume_bit_identical"], strategy
            assert run["carried_keys"] == ["momentum_buffer"], strategy
            for mode in ("ddp", "fsdp"):
                for phase, sent in run[mode]["analytic_phases"].items():
                    assert run[mode]["measured_phases"].get(phase, 0.0) == pytest.approx(sent, rel=1e-9), (strategy, mode, phase)
            ratio = run["fsdp"]["measured_phases"]["sync"] / run["ddp"]["measured_phases"]["sync"]
            assert abs(ratio - 0.5) <= 0.02 * 0.5, (strategy, ratio)
        assert result["carry"]["allgather"]["differs_from_reset"] > 1e-4  # the carried momentum changed the run
        # carrying momentum about doubles the sync (momentum moves like its parameter; BN statistics once)
        carried = result["carry"]["allgather"]["fsdp"]["measured_phases"]["sync"]
        assert 1.8 < carried / result["fsdp"]["measured_phases"]["sync"] <= 2.0
        # the bf16 policy trains (it failed inside batch_norm before BatchNorms kept fp32 parameters)
        assert result["bf16_finite"] and result["bf16_moved"] > 0.01


def test_an_unknown_replica_mode_is_a_one_line_error():
    with pytest.raises(ConfigError, match="--replicas must be one of ddp, fsdp"):
        check_replicas("zero")


def _fsdp_env(monkeypatch, **settings):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    defaults = {"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_RESHARD_AFTER_FORWARD": "true",
                "FSDP_ACTIVATION_CHECKPOINTING": "false", "ACCELERATE_MIXED_PRECISION": "no"}
    for key, value in {**defaults, **settings}.items():
        monkeypatch.setenv(key, value)


def test_an_accelerate_fsdp_config_means_replicas_fsdp(monkeypatch):
    from loft_ext.engine.config import OutputHparams
    from loft_ext.engine.setup import fsdp_from_launcher

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_from_launcher(OutputHparams()).replicas == "ddp"  # no FSDP launcher: nothing changes
    _fsdp_env(monkeypatch, ACCELERATE_MIXED_PRECISION="bf16")
    out = fsdp_from_launcher(OutputHparams())
    assert (out.replicas, out.mixed_precision) == ("fsdp", "bf16")
    assert "ACCELERATE_USE_FSDP" not in os.environ  # the Accelerator must not wrap models itself


@pytest.mark.parametrize("settings, message", [
    ({"FSDP_VERSION": "1"}, "fsdp_version: 1 .*set fsdp_version: 2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fsdp_activation_checkpointing: true"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, "fsdp_reshard_after_forward: false"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision fp16 is not supported")])
def test_accelerate_fsdp_settings_not_built_are_one_line_errors(monkeypatch, settings, message):
    from loft_ext.engine.config import OutputHparams
    from loft_ext.engine.setup import fsdp_from_launcher

    _fsdp_env(monkeypatch, **settings)
    with pytest.raises(ConfigError, match=message):
        fsdp_from_launcher(OutputHparams())
