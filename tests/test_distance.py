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
