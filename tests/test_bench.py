"""`make bench` in its smoke size: every benchmark runs, writes its numbers, and the numbers make sense.

One run of ``benchmarks/bench.py --smoke`` (about a minute on 2 CPU cores: it starts gloo process
groups with torchrun and one process per memory row); the tests below read its JSON.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ddp", "localsgd", "allgather", "alltoall")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--smoke", "--output", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        data = json.load(f)
    data["text"] = out.with_suffix(".txt").read_text()
    data["stdout"] = proc.stdout
    return data


def test_communication_measured_equals_analytic(smoke):
    result = smoke["benchmarks"]["communication"]["result"]
    assert sorted(run["method"] for run in result["runs"]) == sorted(METHODS)
    for run in result["runs"]:
        assert run["measured_bytes"] > 0
        assert run["measured_bytes"] == pytest.approx(run["analytic_bytes_same_steps"], rel=1e-9), run["method"]
    (row,) = result["table"]
    for method in (*METHODS, "star"):
        assert row[method] > 0
    assert row["ddp"] > row["localsgd"] > row["alltoall"]  # L=2: local SGD averages every 2nd step, LoFT moves less


def test_memory_ratios_of_sub_networks(smoke):
    rows = smoke["benchmarks"]["memory"]["result"]["rows"]
    assert [(r["model"], r["S"]) for r in rows] == [("resnet18", 1), ("resnet18", 2), ("resnet18", 4)]
    for r in rows:
        exact = r["exact"]
        assert min(exact["params"], exact["grads"], exact["optimizer_state"], exact["activations"]) > 0
        assert exact["grads"] == exact["params"] == exact["optimizer_state"]  # SGD momentum: one buffer per param
        assert r["rss"]["growth"] > 0
    for r in rows[1:]:
        assert 0 < r["ratio_exact"] < 1 and 0 < r["ratio_rss"] < 1
    assert rows[2]["ratio_exact"] < rows[1]["ratio_exact"]  # S=4 is narrower than S=2


def test_sync_and_compute_times(smoke):
    strategies = smoke["benchmarks"]["sync_time"]["result"]["strategies"]
    assert sorted(strategies) == ["allgather", "alltoall"]
    for r in strategies.values():
        assert len(r["ranks"]) == 2
        assert r["median_seconds"]["compute"] > 0 and r["median_seconds"]["sync"] > 0
        assert r["sync_bytes_sent_per_round"] > 0
    assert (strategies["alltoall"]["sync_bytes_sent_per_round"]
            < strategies["allgather"]["sync_bytes_sent_per_round"])
    collective = {"allgather": "c10d::_allgather_base_", "alltoall": "c10d::alltoall_base_"}
    for name, r in strategies.items():  # --profile: every rank's ops of the sync, its collective among them
        for rank in r["ranks"]:
            ops = rank["profile_ms_per_sync"]
            assert ops[collective[name]] > 0 and ops["c10d::allreduce_"] > 0, sorted(ops)


def test_step_times(smoke):
    result = smoke["benchmarks"]["step_time"]["result"]
    assert set(result["layouts"]) == {"contiguous", "channels_last"}
    for layout in result["layouts"].values():
        assert set(layout["median_seconds"]) == {"dense", "S=2", "S=4"}
        assert all(t > 0 for t in layout["median_seconds"].values())
        kinds = {k: v["ms_per_step_by_kind"] for k, v in layout["profile"]["models"].items()}  # --profile 1
        assert set(kinds) == {"dense", "S=2", "S=4"}
        assert all(v["convolution"] > 0 and v["batch norm"] > 0 for v in kinds.values())
        assert kinds["S=4"]["convolution"] < kinds["dense"]["convolution"]


def test_combined_table_and_provenance(smoke):
    benchmarks = {row["benchmark"] for row in smoke["table"]}
    assert benchmarks == {"communication", "step time", "memory", "fsdp memory", "sync time", "ticket speed"}
    exactness = [r for r in smoke["table"] if r["measure"].startswith("max |measured / analytic")]
    assert exactness and all(r["status"] == "met" for r in exactness)
    assert smoke["machine"]["cpus"] >= 1 and smoke["machine"]["versions"]["torch"]
    assert smoke["machine"]["versions"]["timm"] and smoke["machine"]["python"]
    assert "bench.py --smoke" in smoke["command"]
    for row in smoke["table"]:
        assert row["shown"] in smoke["text"]


def test_fsdp_memory_rows(smoke):
    """Smoke: resnet18 S=2 x D=2 on 4 gloo processes, FSDP vs DDP replicas, exact accounting."""
    result = smoke["benchmarks"]["fsdp_memory"]["result"]
    assert len(result["table"]) == 4
    for rank in result["ranks"].values():
        ddp, fsdp = rank["ddp"], rank["fsdp"]
        for kind in ("params", "grads", "optimizer_state"):  # 1/D of the DDP replica's, exactly
            assert abs(fsdp[kind] / ddp[kind] - 0.5) <= 0.01, kind
        # during the round the plain copy keeps only its buffers (its parameters are released)
        assert fsdp["plain_copy"] == fsdp["buffers"] and ddp["plain_copy"] == 0 and fsdp["fsdp_unsharded"] > 0
        assert fsdp["activations"] == ddp["activations"] > 0 and fsdp["full_model"] == ddp["full_model"]
    assert abs(result["sync_ratio_max"] - 0.5) <= 0.01  # the filter axis moves shards
    rows = {r["measure"]: r for r in smoke["table"] if r["benchmark"] == "fsdp memory"}
    assert rows["LoFT sync bytes per rank fsdp / ddp"]["status"] == "met"


def test_ticket_speed_rows(smoke):
    """Smoke: resnet18 @ 32, r=0.8, both scopes, eager and exported, batches 1 and 8, one thread."""
    result = smoke["benchmarks"]["ticket_speed"]["result"]
    cells = {(r["scope"], r["engine"], r["batch"]) for r in result["rows"]}
    assert cells == {(s, e, b) for s in ("per-group", "hidden+stream") for e in ("eager", "exported") for b in (1, 8)}
    info = result["models"]["resnet18:32"]
    # streams pruned too: fewer FLOPs and parameters than the hidden-only ticket at the same ratio
    assert info["hidden+stream r=0.8"]["flops"] < info["per-group r=0.8"]["flops"] < info["dense"]["flops"]
    assert info["hidden+stream r=0.8"]["params"] < info["per-group r=0.8"]["params"]
    for r in result["rows"]:
        assert r["dense_s"] > 0 and r["ticket_s"] > 0 and r["flop_ratio"] > 1
        assert r["speedup"] == pytest.approx(r["dense_s"] / r["ticket_s"])
    rows = [r for r in smoke["table"] if r["benchmark"] == "ticket speed"]
    assert any(r["measure"] == "throughput compact / dense" for r in rows)
    assert all(r["status"] in ("not judged (smoke)", "-") for r in rows)
