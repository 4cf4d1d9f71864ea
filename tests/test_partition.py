import numpy as np
import pytest

from fedge.sim.digits_shift import TEST_DRAWS
from fedge.sim.partition import dirichlet_partition


def test_partition_is_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_partition(labels, 6, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 8


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = np.repeat(np.arange(10), 100)

    def mean_entropy(alpha: float) -> float:
        ents = []
        for p in dirichlet_partition(labels, 8, alpha=alpha, seed=0):
            freq = np.bincount(labels[p], minlength=10) / len(p)
            freq = freq[freq > 0]
            ents.append(-(freq * np.log(freq)).sum())
        return float(np.mean(ents))

    assert mean_entropy(0.1) < mean_entropy(100.0) - 0.5


def test_partition_is_seeded():
    labels = np.repeat(np.arange(10), 30)
    a = dirichlet_partition(labels, 4, alpha=0.5, seed=7)
    b = dirichlet_partition(labels, 4, alpha=0.5, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_impossible_partition_is_a_clear_error():
    with pytest.raises(ValueError, match="could not give"):
        dirichlet_partition(np.arange(20) % 10, 10, alpha=0.5, seed=0, min_size=8)


def test_scenario_clients_have_their_own_shift_and_splits(digits):
    a, b = digits.client_data(0, 4), digits.client_data(1, 4)
    assert a.shift != b.shift
    assert len(a.train) > len(a.test) // TEST_DRAWS > 0
    assert a.train.tensors[0].shape[1:] == (1, 32, 32)
    assert a.tier.tier != b.tier.tier
