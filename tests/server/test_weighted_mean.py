import numpy as np

from server.aggregation import WeightedMeanAccumulator


def _updates(count: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(0)
    return (
        [rng.normal(size=1000).astype(np.float32) for _ in range(count)],
        [float(w) for w in rng.integers(1, 500, count)],
    )


def test_mean_of_many_updates_matches_float64_reference() -> None:
    updates, weights = _updates(40)  # spans two flushed blocks and a partial one
    mean = WeightedMeanAccumulator(1000)
    for update, weight in zip(updates, weights, strict=True):
        mean.accumulate(update, weight)

    expected = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)) / sum(
        weights
    )

    np.testing.assert_allclose(mean.finalize(), expected, rtol=0, atol=1e-6)
    assert mean.count == 40


def test_merged_shards_equal_one_accumulator() -> None:
    updates, weights = _updates(21)
    whole, left, right = (WeightedMeanAccumulator(1000) for _ in range(3))
    for index, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        whole.accumulate(update, weight)
        (left if index % 3 else right).accumulate(update, weight)

    left.merge(right)

    np.testing.assert_allclose(left.finalize(), whole.finalize(), rtol=0, atol=1e-6)
    assert (left.count, left.total_weight) == (whole.count, whole.total_weight)
