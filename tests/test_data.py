"""Built-in data and per-worker orders."""
import pytest
import torch

from conftest import write_noise_imagefolder
from loft_ext.data import BatchStream, DataError, SeededSamples, WorkerSampler, load_dataset


def test_digits_is_real_and_split():
    data = load_dataset("digits", image_size=32)
    assert (len(data.train), len(data.test)) == (1437, 360)
    x, y = data.train[0]
    assert x.shape == (1, 32, 32) and data.in_chans == 1 and data.num_classes == 10
    assert torch.bincount(data.test.tensors[1], minlength=10).min() >= 35  # stratified


def test_own_shuffle_gives_each_worker_the_whole_set_in_its_own_order():
    a, b = WorkerSampler(100, 0, 2, "own-shuffle", 0), WorkerSampler(100, 1, 2, "own-shuffle", 0)
    la, lb = list(a), list(b)
    assert sorted(la) == sorted(lb) == list(range(100)) and la != lb
    a.set_epoch(1)
    assert list(a) != la and sorted(a) == list(range(100))
    assert list(WorkerSampler(100, 0, 2, "own-shuffle", 0)) == la  # a function of (seed, worker, epoch)


def test_shard_gives_disjoint_shards_that_cover_the_set():
    shards = [set(WorkerSampler(101, s, 3, "shard", 4)) for s in range(3)]
    assert sum(len(s) for s in shards) == 101 and set().union(*shards) == set(range(101))
    assert [len(s) for s in shards] == [34, 34, 33]


def test_batch_stream_runs_across_epochs():
    data = load_dataset("digits")
    stream = BatchStream(data.train, 500, 0, 1)
    assert stream.steps_per_epoch == 2
    for _ in range(5):
        x, _ = stream.next()
        assert x.shape[0] == 500
    assert stream.epoch == 2


@pytest.mark.parametrize("name,data_dir,match", [
    ("cifar10", "", "needs --data_dir"),
    ("cifar10", "/nonexistent/cifar", "does not exist"),
    ("fashion_mnist", "/nonexistent", "does not exist"),
    ("imagefolder", "/tmp", "must hold train/"),
    ("mnist3d", "", "unknown dataset 'mnist3d'"),
])
def test_missing_data_is_a_clear_error(name, data_dir, match):
    with pytest.raises(DataError, match=match):
        load_dataset(name, data_dir)


def test_cifar_dir_without_the_files(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))


def test_imagefolder_loads_local_images(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 80, 20, 200)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset("imagefolder", str(tmp_path), image_size=24)
    assert data.num_classes == 2 and len(data.train) == 4 and data.test[0][0].shape == (3, 24, 24)


def test_augmented_batches_are_a_function_of_seed_worker_epoch_and_index(tmp_path):
    """Random crops and flips are seeded per sample: the batches do not depend on the number of loader
    processes, on other users of the global RNG, or on a resume mid-epoch."""
    data = load_dataset("imagefolder", str(write_noise_imagefolder(tmp_path)), image_size=24)
    assert data.augmented  # RandomResizedCrop + RandomHorizontalFlip

    def batches(num_workers, n=4):  # 24 images, batch 8: 3 steps per epoch, so n=4 crosses an epoch end
        stream = BatchStream(data.train, 8, 1, 2, seed=3, num_workers=num_workers, augmented=True)
        out = []
        for _ in range(n):
            torch.rand(7)  # someone else draws from the global RNG between batches
            out.append(stream.next()[0])
        return out

    in_process, two_loaders = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, two_loaders))
    resumed = BatchStream(data.train, 8, 1, 2, seed=3, augmented=True)
    resumed.load_state_dict({"epoch": 0, "consumed": 2})
    assert torch.equal(resumed.next()[0], in_process[2]) and torch.equal(resumed.next()[0], in_process[3])
    # the augmentation is random, and the seed decides it
    seeded = SeededSamples(data.train)
    assert torch.equal(seeded[(0, 11)][0], seeded[(0, 11)][0]) and not torch.equal(seeded[(0, 11)][0], seeded[(0, 12)][0])
    other_worker = BatchStream(data.train, 8, 0, 2, seed=3, augmented=True)
    assert not torch.equal(other_worker.next()[0], in_process[0])


def _write_idx(path, array, magic):
    import struct

    import numpy as np

    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_fashion_mnist_reads_torchvision_layout(tmp_path):
    import numpy as np

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 0x801)
    data = load_dataset("fashion_mnist", str(tmp_path))
    assert (len(data.train), len(data.test), data.in_chans, data.num_classes) == (12, 5, 1, 10)
    x, y = data.train[3]
    assert x.shape == (1, 28, 28) and y == 3
