import numpy as np
import pytest

from emulator.data import dirichlet_label_split, federated_digits, load_digits


def _label_skew(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean over clients of the share of their most common label."""
    return float(np.mean([np.bincount(labels[s]).max() / len(s) for s in shards]))


def test_split_assigns_every_example_exactly_once() -> None:
    labels = load_digits().y

    shards = dirichlet_label_split(labels, 20, 0.5, np.random.default_rng(0))

    assert sorted(np.concatenate(shards).tolist()) == list(range(len(labels)))
    assert min(len(s) for s in shards) >= 2


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = load_digits().y

    skewed = dirichlet_label_split(labels, 30, 0.1, np.random.default_rng(0))
    near_iid = dirichlet_label_split(labels, 30, 100.0, np.random.default_rng(0))

    assert _label_skew(labels, skewed) > 2 * _label_skew(labels, near_iid)


def test_split_is_reproducible_from_its_seed() -> None:
    first, second = federated_digits(10, seed=4), federated_digits(10, seed=4)

    assert all(np.array_equal(a.y, b.y) for a, b in zip(first.clients, second.clients, strict=True))


def test_held_out_split_is_disjoint_from_client_data() -> None:
    data = federated_digits(10, seed=1)
    train_rows = {row.tobytes() for c in data.clients for row in c.x}
    digits = load_digits()
    duplicates = len(digits.x) - len({row.tobytes() for row in digits.x})

    overlap = sum(row.tobytes() in train_rows for row in data.test.x)

    assert len(data.test) == 359
    assert sum(len(c) for c in data.clients) == len(digits) - 359
    assert overlap <= duplicates  # only images that occur twice in the data set itself


def test_impossible_split_says_why() -> None:
    with pytest.raises(ValueError, match="cannot give 100 clients"):
        dirichlet_label_split(np.zeros(50, np.int64), 100, 0.5, np.random.default_rng(0))
