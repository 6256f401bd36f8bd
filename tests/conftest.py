import os
import socket
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A TCP port no one listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str, nproc: int) -> list[str]:
    """The command line that starts ``nproc`` local processes with ``name`` (torchrun, accelerate, deepspeed),
    each launch on its own free rendezvous port: the launchers' shared default (29500) clashes when two launches
    overlap (pytest-xdist) or a killed run's socket lingers. Accelerate runs need ``ACCELERATE_USE_CPU=1``."""
    port = str(free_port())
    if name == "torchrun":
        return [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", port]
    if name == "accelerate":
        return [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", port]
    if name == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", port]
    raise ValueError(f"unknown launcher {name!r}")


def shm_left_behind(cmd: list[str]) -> list[str]:
    """DeepSpeed CPU shared-memory segments still in /dev/shm from the launch ``cmd`` (by its rendezvous port):
    loft_ext unlinks them (loft_ext.parallel.ds.release_shm_workspace); left behind they fill the RAM."""
    port = cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd else cmd[cmd.index("--main_process_port") + 1]
    shm = "/dev/shm"
    return [n for n in os.listdir(shm) if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n] \
        if os.path.isdir(shm) else []


# the families the partition engine must support (issue 2)
FAMILIES = ["resnet18", "resnet34", "resnet50", "resnet26d", "wide_resnet50_2", "resnetv2_50",
            "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"]


# tests that start process groups (torchrun, accelerate launch, deepspeed; fixed rendezvous ports) run one
# after another on one pytest-xdist worker (`make test` uses -n 2 --dist loadgroup); the rest run beside them
_LAUNCHING_MODULES = {"test_distributed", "test_reliability", "test_deepspeed", "test_grid", "test_bench",
                      "test_study", "test_gpu_check"}
_LAUNCH_WORDS = ("launcher(", "torchrun", "\"launch\"", "--num_gpus", "_launch(", "_kill_a_rank", "nproc_per_node", "--nnodes")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        if module in _LAUNCHING_MODULES or any(word in source for word in _LAUNCH_WORDS):
            item.add_marker(pytest.mark.xdist_group("processes"))


@pytest.fixture(scope="session")
def model_cache():
    """timm models by name, built once per session with a fixed seed (tests deep-copy before mutating)."""
    from loft_ext.models import create_model

    cache = {}

    def get(name, num_classes=10, in_chans=3):
        key = (name, num_classes, in_chans)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = create_model(name, num_classes=num_classes, in_chans=in_chans)
        return cache[key]

    return get


def write_noise_imagefolder(root, per_class=12, size=40, classes=("a", "b")):
    """A real imagefolder data set of random-noise PNGs (train/ and val/), so random crops differ."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def check_pretrain_bytes(run_dir, row, table=None):
    """The ticket row's pre MiB is every pretraining phase rank 0 sent bytes in (its comm-rank0.json
    counters), with the breakdown per phase; ``table``: the printed table, whose pre MiB cell must agree."""
    import json

    measured = json.loads((run_dir / "comm-rank0.json").read_text())["measured"]
    phases = {p: c["bytes_sent"] for p, c in measured.items() if c["bytes_sent"] > 0}
    assert row["pretrain_bytes_by_phase"] == phases
    assert row["pretrain_bytes"] == sum(phases.values()) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pretrain_bytes"] == row["pretrain_bytes"]
    if table is not None:
        lines = table.splitlines()
        at = max(i for i, line in enumerate(lines) if "pre MiB" in line)
        end = lines[at].index("pre MiB") + len("pre MiB")  # cells are right-aligned under their title
        assert lines[at + 1][:end].split()[-1] == f"{row['pretrain_bytes'] / 2 ** 20:.1f}"
    return phases


def randomise_bn(model, seed=0):
    """Random BatchNorm affine parameters and statistics, so that eval-mode outputs depend on every channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
