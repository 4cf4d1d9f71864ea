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


def test_each_test_image_is_seen_through_several_takes_of_its_clients_camera(digits):
    data = digits.client_data(2, 4)
    x, y = data.test.tensors
    images = len(y) // TEST_DRAWS
    assert len(y) == TEST_DRAWS * images
    assert all(np.array_equal(y[:images], y[d * images:(d + 1) * images]) for d in range(TEST_DRAWS))
    takes = x.reshape(TEST_DRAWS, images, -1)
    assert all(not np.array_equal(takes[0], takes[d]) for d in range(1, TEST_DRAWS))  # each take differs
    assert digits.describe(4)["test_samples"] == sum(len(digits.client_data(p, 4).test) for p in range(4))


def test_the_first_take_and_the_training_split_are_what_a_single_take_scenario_had(digits):
    """Existing figures stay comparable: training data, partitions and the first test take are unchanged."""
    from fedge.sim.partition import dirichlet_partition

    _, _, x_t, y_t = digits._split
    idx = dirichlet_partition(y_t, 4, digits.alpha, seed=digits.seed)[1]
    rng = np.random.default_rng([digits.seed, 2, 1])
    images = digits.client_shift(1).apply(x_t[idx], rng)
    order = rng.permutation(len(idx))
    n_test = max(2, round(digits.test_fraction * len(idx)))
    data = digits.client_data(1, 4)
    assert np.array_equal(data.train.tensors[0][:, 0].numpy(), images[order[n_test:]])
    assert np.array_equal(data.test.tensors[0][:n_test, 0].numpy(), images[order[:n_test]])


def test_a_large_fleet_draws_shards_and_never_tests_on_a_trained_image(digits):
    from fedge.sim.digits_shift import DRAWN_TEST, DRAWN_TRAIN, MAX_DISJOINT_CLIENTS

    clients = 1000
    assert digits.drawn(clients) and not digits.drawn(MAX_DISJOINT_CLIENTS)
    train_pool, test_pool = digits._pools
    assert not set(train_pool) & set(test_pool)
    a, b = digits.client_data(0, clients), digits.client_data(999, clients)
    assert len(a.train) == DRAWN_TRAIN and len(a.test) == DRAWN_TEST  # a large fleet's clients take each image once
    assert a.shift != b.shift
    assert np.array_equal(a.train.tensors[0], digits.client_data(0, clients).train.tensors[0])  # seeded
    described = digits.describe(clients)
    assert len(described["clients"]) == clients and described["test_samples"] == clients * DRAWN_TEST


def test_dirichlet_draws_are_label_skewed_and_stay_in_the_pool():
    from fedge.sim.partition import dirichlet_draw

    labels = np.repeat(np.arange(10), 20)
    rng = np.random.default_rng(0)
    draws = [dirichlet_draw(labels, 40, 0.1, rng) for _ in range(20)]
    assert all(len(d) == 40 and d.min() >= 0 and d.max() < len(labels) for d in draws)
    classes_per_client = [len(np.unique(labels[d])) for d in draws]
    assert np.mean(classes_per_client) < 5  # alpha 0.1: a few classes each
