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
def test_fsdp_replicas_equal_ddp_replicas_with_half_the_state_bytes(ranks):
    for result in ranks:
        # D = 2: the reduce-scatter sums two gradients (order-free) and halves them exactly, so no tolerance
        assert result["bit_identical"] and result["max_abs_diff"] == 0.0 and result["moved"] > 0.1
        ddp, fsdp = result["ddp"]["state_bytes"], result["fsdp"]["state_bytes"]
        for kind in ("params", "grads", "optimizer_state"):
            assert abs(fsdp[kind] / ddp[kind] - 0.5) <= 0.02 * 0.5, (kind, fsdp, ddp)
        for run in ("ddp", "fsdp"):  # the filter-axis sync is the DDP one for now: equal to the analytic count
            assert result[run]["sync_sent"] == result[run]["analytic_sync_sent"]
        # a round-boundary resume from the assembled model alone (what the checkpoint holds) is bit for bit
        assert result["resume_bit_identical"]


@pytest.mark.parametrize("replicas, state, message", [
    ("fsdp", "carry", "--replicas fsdp cannot carry optimizer state"),
    ("zero", "reset", "--replicas must be one of ddp, fsdp")])
def test_replica_modes_not_built_are_one_line_errors(replicas, state, message):
    with pytest.raises(ConfigError, match=message):
        check_replicas(replicas, state)
