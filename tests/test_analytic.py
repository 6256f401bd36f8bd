"""The analytic communication count against hand formulas (the measured count is checked on gloo), and
the flat buffers the sync packs into."""
import pytest

from loft_ext.parallel import analytic
from loft_ext.parallel.grid import GridError, check_world
from loft_ext.partition.plan import make_plan
from loft_ext.partition.subnet import draw_partition


@pytest.mark.parametrize("workers", [2, 4])
def test_allgather_and_alltoall_counts(model_cache, workers):
    model = model_cache("resnet18")
    plan = make_plan(model, workers, "all", model_name="resnet18")
    params = dict(model.named_parameters())
    split = sum(p.numel() for n, p in params.items() if n in plan.tensor_dims)
    split += sum(b.numel() for n, b in model.named_buffers() if n in plan.tensor_dims)
    shared = sum(t.numel() for n, t in list(params.items()) + list(model.named_buffers())
                 if n not in plan.tensor_dims and t.is_floating_point())
    all_reduce = 2 * (workers - 1) / workers * 4 * shared
    # resnet18's hidden widths divide by 2 and 4: every worker holds exactly 1/S of the split entries
    assert analytic.allgather_round_bytes(model, plan, workers, 4) == pytest.approx(
        (workers - 1) * 4 * split / workers + all_reduce)
    assert analytic.alltoall_expected_round_bytes(model, plan, workers, 4) == pytest.approx(
        (workers - 1) / workers ** 2 * 4 * split + all_reduce)
    exact = [analytic.alltoall_round_bytes(model, plan, draw_partition(plan, 0, r), draw_partition(plan, 0, r + 1),
                                           0, workers, 4)[0] for r in range(10)]
    assert sum(exact) / len(exact) == pytest.approx(
        analytic.alltoall_expected_round_bytes(model, plan, workers, 4), rel=0.02)
    # carry: SGD momentum travels with every parameter
    assert analytic.allgather_round_bytes(model, plan, workers, 4, state_copies=1) > \
        analytic.allgather_round_bytes(model, plan, workers, 4)


def test_world_size_must_be_a_multiple_of_s():
    assert check_world(6, 3) == 2
    with pytest.raises(GridError, match="world size 4 is not a multiple of S=3.*launch 3, 6, 9"):
        check_world(4, 3)


def test_pack_reuses_a_dirty_buffer_and_zeroes_the_padding():
    """Sync buffers are kept between rounds: packing into last round's buffer must leave no stale values."""
    import torch

    from loft_ext.parallel.sync import _Buffers, _pack, _unpack
    buffers = _Buffers()
    a, b = torch.arange(6.0).view(2, 3), torch.full((4,), 7.0)
    first = buffers.get("send", 12, a)
    first.fill_(float("nan"))
    flat = _pack([a, b], 12, out=buffers.get("send", 12, a))
    assert flat.data_ptr() == first.data_ptr()  # the same memory, reused
    assert torch.equal(flat, torch.cat([a.reshape(-1), b, torch.zeros(2)]))
    back = _unpack(flat, [(2, 3), (4,)])
    assert torch.equal(back[0], a) and torch.equal(back[1], b)
    assert buffers.get("send", 20, a).numel() == 20  # grows when a round needs more
    assert torch.equal(_pack([a]), a.reshape(-1))  # no length, no buffer: a fresh tensor
