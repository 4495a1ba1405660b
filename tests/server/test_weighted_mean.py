import numpy as np
import pytest

from device_runtime import constants
from protos import device_pb2
from server.aggregation import Float32WeightedMean, WeightedMeanAccumulator, joined
from server.errors import InvalidArgument


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


def _float32_header(n: int, example_count: int) -> device_pb2.UploadHeader:
    return device_pb2.UploadHeader(
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        num_elements=n,
        example_count=example_count,
    )


@pytest.mark.parametrize("cuts", [[400], [4, 8, 3996], [1, 2001], [0, 4000]], ids=str)
def test_an_update_in_chunks_adds_exactly_what_the_joined_update_adds(cuts: list[int]) -> None:
    updates, weights = _updates(3)
    whole, chunked = Float32WeightedMean(1000), Float32WeightedMean(1000)
    for update, weight in zip(updates, weights, strict=True):
        payload = update.astype("<f4").tobytes()
        bounds = [0, *cuts, len(payload)]
        chunks = [memoryview(payload)[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        whole.accumulate(_float32_header(1000, int(weight)), payload)
        chunked.accumulate_chunks(_float32_header(1000, int(weight)), chunks)

    np.testing.assert_array_equal(chunked.finalize()[0], whole.finalize()[0])


def test_a_non_finite_value_in_a_later_chunk_zeroes_the_whole_update() -> None:
    update = np.ones(1000, "<f4")
    update[900] = np.nan
    payload = update.tobytes()
    mean = Float32WeightedMean(1000)

    mean.accumulate_chunks(_float32_header(1000, 5), [payload[:2000], payload[2000:]])
    mean.accumulate(_float32_header(1000, 5), np.full(1000, 2.0, "<f4").tobytes())

    result, metrics = mean.finalize()
    np.testing.assert_array_equal(result, np.full(1000, 2.0, np.float32))
    assert metrics["aggregator/num_nonfinite_updates"] == 1.0


def test_chunks_that_do_not_add_up_are_refused_and_change_nothing() -> None:
    mean = Float32WeightedMean(1000)

    with pytest.raises(InvalidArgument, match="payload is 3996 bytes, expected 4000"):
        mean.accumulate_chunks(_float32_header(1000, 5), [bytes(2000), bytes(1996)])

    assert (mean.count, mean.total_weight) == (0, 0.0)


@pytest.mark.parametrize("cuts", [[], [0], [3], [1, 1, 7], [5, 4094]], ids=str)
def test_an_update_received_in_uneven_chunks_is_joined_exactly(cuts: list[int]) -> None:
    payload = np.arange(1024, dtype="<f4").tobytes()
    bounds = [0, *cuts, len(payload)]
    parts = [memoryview(payload)[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    assert bytes(joined(parts)) == payload
