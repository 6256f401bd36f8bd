"""The filter distance against a brute-force reference, and its random-permutation expectation."""
import math
import random

import pytest
import torch

from loft_ext.plugins.distance import expected_distance, filter_distance, normalised_distance, ranking


def brute_force(norms_a, norms_b):
    """F(A, B) straight from the definition, with Python lists and loops."""
    n = len(norms_a)
    order_a = sorted(range(n), key=lambda k: (-norms_a[k], k))  # largest first, ties by index
    order_b = sorted(range(n), key=lambda k: (-norms_b[k], k))
    pos_b = {f: p + 1 for p, f in enumerate(order_b)}
    return sum(abs(math.log(i) - math.log(pos_b[order_a[i - 1]])) / i for i in range(1, n + 1))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 255, 1024])
def test_matches_brute_force_on_random_filters(n):
    rng = random.Random(n)
    for _ in range(3):
        a = [rng.random() for _ in range(n)]
        b = [rng.random() for _ in range(n)]
        got = filter_distance(ranking(torch.tensor(a, dtype=torch.float64)), ranking(torch.tensor(b, dtype=torch.float64)))
        assert got == pytest.approx(brute_force(a, b), rel=1e-12, abs=1e-12)


def test_identity_is_zero_and_the_metric_is_asymmetric():
    a = ranking(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    assert filter_distance(a, a) == 0.0
    # B moves the top filter to the bottom: A -> B and B -> A weigh different positions
    b = ranking(torch.tensor([0.5, 4.0, 3.0, 2.0, 1.0]))
    ab, ba = filter_distance(a, b), filter_distance(b, a)
    assert ab == pytest.approx(math.log(5) + sum(abs(math.log(i) - math.log(i - 1)) / i for i in range(2, 6)))
    assert ba == pytest.approx(sum(abs(math.log(i) - math.log(i + 1)) / i for i in range(1, 5)) + math.log(5) / 5)
    assert ab != pytest.approx(ba)


def test_ties_are_broken_by_filter_index():
    norms = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0])
    assert ranking(norms).tolist() == [1, 2, 4, 0, 3]
    assert filter_distance(ranking(norms), ranking(norms.clone())) == 0.0


@pytest.mark.parametrize("n,about,exact", [(64, 8.3, 8.3251), (128, 11.3, 11.1818), (256, 14.5, 14.5072),
                                           (512, 18.1, 18.3064), (1024, 22.5, 22.5823)])
def test_expectation_matches_the_reference_values(n, about, exact):
    # the reference quotes rounded, probably simulated values ("about"); ours is exact (checked below)
    assert expected_distance(n) == pytest.approx(exact, abs=1e-4)
    assert expected_distance(n) == pytest.approx(about, abs=0.25)


@pytest.mark.parametrize("n", [2, 10, 100])
def test_expectation_matches_simulation(n):
    g = torch.Generator().manual_seed(n)
    a = torch.arange(n)
    samples = [filter_distance(a, torch.randperm(n, generator=g)) for _ in range(4000)]
    mean = sum(samples) / len(samples)
    std = (sum((x - mean) ** 2 for x in samples) / len(samples)) ** 0.5
    assert abs(mean - expected_distance(n)) < 4 * std / len(samples) ** 0.5 + 1e-12
    assert normalised_distance(a, a) == 0.0
    assert expected_distance(1) == 0.0


class _Loop:
    """What DistanceStop reads from the training loop: rounds per epoch, a logger, the two callbacks."""

    def __init__(self, rounds_per_epoch):
        self.rounds_per_epoch, self.found, self.stop_reason, self.lr = rounds_per_epoch, [], None, None
        self.logger = type("Logger", (), {"log": lambda self, values, step: None})()

    def ticket_found(self, name, info):
        self.found.append(name)

    def request_stop(self, reason):
        self.stop_reason = reason


def _fire_round(rule_kwargs, rounds_per_epoch=4, lr_of=None):
    """Records every 2 rounds of a conv whose filter ranking changes between rounds 2 and 4 and then stays;
    the round at which DistanceStop fires (None: never)."""
    from loft_ext.plugins.distance import DistanceStop, FilterDistance

    conv = torch.nn.Conv2d(1, 8, 1, bias=False)
    recorder = FilterDistance(every=2)
    recorder.layers, recorder.rankings = ["conv"], {"conv": []}
    rule = DistanceStop(recorder, eps=0.05, stop=True, **rule_kwargs)
    loop = _Loop(rounds_per_epoch)
    model = torch.nn.Sequential()
    model.add_module("conv", conv)
    for r in range(2, 21, 2):
        norms = torch.tensor([3.0, 1, 4, 1.5, 5, 9, 2, 6]) if r == 2 else torch.arange(8, dtype=torch.float32)
        with torch.no_grad():
            conv.weight.copy_(norms.view(8, 1, 1, 1))
        recorder.record(model, r)
        loop.lr = lr_of(r) if lr_of else None
        rule.on_after_sync(loop, r - 1, model)
        if rule.fired_at is not None:
            assert loop.found == ["distance_stop"] and loop.stop_reason
            return rule.fired_at
    return None


def test_distance_window_in_records_and_in_epochs():
    # 2 records: round 6 sees only round 4 (same ranking) -> fires at 6
    assert _fire_round({"window": 2}) == 6
    # 3 records: round 6 still sees round 2's ranking; round 8 sees 4 and 6 -> 8
    assert _fire_round({"window": 3}) == 8
    # a window of 1 epoch = 4 rounds: round 6 compares with rounds 2 and 4 (2 differs), round 8 with 4, 6
    assert _fire_round({"window_epochs": 1.0}) == 8
    # 2 epochs = 8 rounds: not checked before round 10 (2 + 8), which still sees round 2 -> 12
    assert _fire_round({"window_epochs": 2.0}) == 12
    # the same epochs with 2 rounds per epoch: 2 epochs = 4 rounds -> as window_epochs=1 above
    assert _fire_round({"window_epochs": 2.0}, rounds_per_epoch=2) == 8


def test_distance_rule_waits_for_the_learning_rate_to_fall():
    # the ranking is stable from round 4 on (fires at 6 ungated); the lr halves at round 11
    def step(r):
        return 0.1 if r <= 10 else 0.05

    assert _fire_round({"window": 2}, lr_of=step) == 6   # lr_below=1: the lr is not consulted
    # 0.5: records at rounds 6-10 are seen at the peak and skipped; round 12 (lr 0.05) is checked
    assert _fire_round({"window": 2, "lr_below": 0.5}, lr_of=step) == 12
    assert _fire_round({"window": 2, "lr_below": 0.4}, lr_of=step) is None   # never falls that far
    # warm-up then decay: the peak is the highest lr seen, not the first one
    assert _fire_round({"window": 2, "lr_below": 0.5}, lr_of=lambda r: [0.02, 0.1, 0.1, 0.1, 0.05][min(r // 4, 4)]
                       ) == 16
    with pytest.raises(ValueError, match="needs the round's learning rate"):
        _fire_round({"window": 2, "lr_below": 0.5})
    with pytest.raises(ValueError, match=r"lr_below must be in \(0, 1\]"):
        _fire_round({"lr_below": 0})


def test_distance_rule_resumes_its_peak_learning_rate():
    from loft_ext.plugins.distance import DistanceStop, FilterDistance

    rule = DistanceStop(FilterDistance(), lr_below=0.5)
    rule.peak_lr, rule.last_checked = 0.1, 3
    again = DistanceStop(FilterDistance(), lr_below=0.5)
    again.load_state_dict(rule.state_dict())
    assert (again.peak_lr, again.last_checked, again.fired_at) == (0.1, 3, None)
    again.load_state_dict({"fired_at": None, "last_checked": 2})   # a checkpoint from before lr_below
    assert again.peak_lr == 0.0


def test_distance_window_refuses_negative_epochs():
    from loft_ext.plugins.distance import DistanceStop, FilterDistance

    with pytest.raises(ValueError, match="window in epochs must be >= 0"):
        DistanceStop(FilterDistance(), window_epochs=-1)
