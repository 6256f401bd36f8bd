"""LoFT rounds in one process: S=1 is plain training, one round's write-back and averaging."""
import copy

import pytest
import torch
import torch.nn.functional as F

from loft_ext.data import BatchStream, load_digits_dataset
from loft_ext.engine.loft import LoFTEngine
from loft_ext.engine.loop import local_step
from loft_ext.partition.plan import make_plan
from loft_ext.partition.subnet import covered_mask, tensors_of


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(32)


def _sgd(lr=0.05, momentum=0.0, wd=5e-4):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


@pytest.mark.parametrize("momentum,optimizer_state,channels_last",
                         [(0.0, "reset", False), (0.9, "carry", False), (0.9, "carry", True)])
def test_single_worker_loft_equals_plain_training(model_cache, digits, momentum, optimizer_state, channels_last):
    name = "resnet18"
    base = model_cache(name, num_classes=10, in_chans=1)
    plain, full = copy.deepcopy(base), copy.deepcopy(base)
    rounds, local_steps = 3, 4
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # --channels_last
    plain.to(memory_format=fmt)
    full.to(memory_format=fmt)

    # plain training of the full model: the oracle
    opt = _sgd(momentum=momentum)(plain.parameters())
    stream = BatchStream(digits.train, 32, 0, 1, "own-shuffle", seed=1)
    plain.train()
    for _ in range(rounds * local_steps):
        x, y = stream.next()
        loss = F.cross_entropy(plain(x.contiguous(memory_format=fmt)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plan = make_plan(full, 1, "all", input_shape=(1, 1, 32, 32), model_name=name)
    engine = LoFTEngine(full, plan, make_optimizer=_sgd(momentum=momentum), seed=1, optimizer_state=optimizer_state)
    convs = [t for t in tensors_of(engine.workers[0].model).values() if t.dim() == 4 and t.shape[-1] > 1]
    assert all(t.is_contiguous(memory_format=fmt) for t in convs)  # the sub-network keeps the layout
    stream = BatchStream(digits.train, 32, 0, 1, "own-shuffle", seed=1)
    for r in range(rounds):
        engine.begin_round(r)
        for _ in range(local_steps):
            local_step(engine.workers[0], *stream.next(), memory_format=fmt)
        engine.sync()
    for (k, a), (_, b) in zip(tensors_of(plain).items(), tensors_of(full).items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name,workers", [("resnet18", 2), ("resnet50", 3)])
def test_one_round_writes_each_slice_back_and_averages_shared(model_cache, digits, name, workers):
    full = copy.deepcopy(model_cache(name, num_classes=10, in_chans=1))
    plan = make_plan(full, workers, "all", input_shape=(1, 1, 32, 32), model_name=name)
    engine = LoFTEngine(full, plan, make_optimizer=_sgd(lr=0.1, momentum=0.9), seed=0)
    before = {k: v.clone() for k, v in tensors_of(full).items()}
    part = engine.begin_round(0)
    streams = [BatchStream(digits.train, 16, s, workers, "own-shuffle", seed=0) for s in range(workers)]
    for w in engine.workers:
        for _ in range(2):
            local_step(w, *streams[w.index].next())
    trained = [{k: v.clone() for k, v in tensors_of(w.model).items()} for w in engine.workers]
    engine.sync()
    after = tensors_of(full)

    for k in plan.tensor_dims:  # split tensors: each held entry comes from exactly its worker
        owner = torch.full(after[k].shape, -1)
        for w in engine.workers:
            idx = w.slicer.indices(part, k)
            held = torch.zeros(after[k].shape, dtype=torch.bool)
            sel = torch.ones(after[k].shape, dtype=torch.bool)
            for dim, ix in idx:
                m = torch.zeros(after[k].shape[dim], dtype=torch.bool)
                m[ix] = True
                shape = [1] * after[k].dim()
                shape[dim] = -1
                sel &= m.view(shape)
            held |= sel
            assert not (owner[held] >= 0).any(), f"{k}: two workers hold one entry"
            owner[held] = w.index
            got = after[k]
            for dim, ix in idx:
                got = got.index_select(dim, ix)
            assert torch.equal(got, trained[w.index][k]), k
        covered = owner >= 0
        assert torch.equal(covered, covered_mask(plan, part, k, after[k].shape))
        assert torch.equal(after[k][~covered], before[k][~covered]), f"{k}: untrained block changed"
        if k.endswith("weight") and after[k].dim() == 4:
            rows = (after[k] != before[k]).flatten(1).any(1)
            assert rows[covered.flatten(1).any(1)].all(), f"{k}: a held filter was not trained"

    for k, v in after.items():  # shared tensors: the mean of the workers' copies
        if k in plan.tensor_dims:
            continue
        copies = [t[k] for t in trained]
        if v.is_floating_point():
            want = copies[0].clone()
            for c in copies[1:]:
                want += c
            assert torch.equal(v, want / workers), k
        else:
            assert torch.equal(v, copies[0]), k
    # workers really trained different copies of the shared weights
    assert not torch.equal(trained[0]["conv1.weight"], trained[1]["conv1.weight"])


def test_optimizer_state_reset_and_carry(model_cache, digits):
    full = copy.deepcopy(model_cache("resnet18", num_classes=10, in_chans=1))
    plan = make_plan(full, 2, "paper", input_shape=(1, 1, 32, 32))
    stream = BatchStream(digits.train, 16, 0, 2, seed=0)
    for mode in ("reset", "carry"):
        engine = LoFTEngine(full, plan, make_optimizer=_sgd(momentum=0.9), seed=0, optimizer_state=mode)
        for r in range(2):
            engine.begin_round(r)
            w = engine.workers[0]
            p = w.model.layer4[1].conv1.weight
            if mode == "reset" or r == 0:
                assert not w.optimizer.state.get(p)
            else:  # momentum of the filters this worker now holds, sliced from the full-size buffer
                idx = w.slicer.indices(engine.partition, "layer4.1.conv1.weight")
                want = engine.full_opt_state["layer4.1.conv1.weight"]["momentum_buffer"].index_select(0, idx[0][1])
                assert torch.equal(w.optimizer.state[p]["momentum_buffer"], want)
                assert want.abs().sum() > 0
            for wk in engine.workers:
                local_step(wk, *stream.next())
            engine.sync()
