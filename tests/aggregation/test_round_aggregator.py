"""Server halves: accumulate, merge, finalize, adaptive state, DP accounting, refusals."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from device_runtime import constants
from device_runtime.aggregation.client import ClientAggregationSpec, encode_update
from protos import device_pb2
from server.aggregation import Float32WeightedMean
from server.aggregators.presets import parse_aggregator
from server.aggregators.process import AggregationProcess
from server.aggregators.round_aggregator import EncodedRoundAggregator
from server.errors import InvalidArgument

SIZES = (3000, 30, 2001, 10)
N = sum(SIZES)


def _process(expression: str, seed: int = 0) -> AggregationProcess:
    return AggregationProcess(parse_aggregator(expression), SIZES, np.random.default_rng(seed))


def _round(process: AggregationProcess) -> EncodedRoundAggregator:
    aggregator = process.start_round()
    assert isinstance(aggregator, EncodedRoundAggregator)
    return aggregator


def _header(example_count: int = 10, num_elements: int = N) -> device_pb2.UploadHeader:
    return device_pb2.UploadHeader(
        example_count=example_count,
        num_elements=num_elements,
        encoding=constants.UPDATE_ENCODING_V1,
    )


def _upload(aggregator: EncodedRoundAggregator, delta: np.ndarray, count: int = 10) -> None:
    spec = ClientAggregationSpec.from_proto(aggregator.client_spec())
    payload = encode_update(spec, delta.astype(np.float32), np.random.default_rng(count))
    aggregator.accumulate(_header(count), payload)


def _deltas(k: int, scale: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    return [(scale * rng.standard_normal(N)).astype(np.float32) for _ in range(k)]


def test_encoded_float32_mean_equals_plain_fedavg() -> None:
    aggregator = _round(_process("zeroing(norm=1000, mean(float32))"))
    plain = Float32WeightedMean(N)
    deltas = _deltas(3)

    for count, delta in zip((1, 3, 6), deltas, strict=True):
        _upload(aggregator, delta, count)
        plain.accumulate(
            device_pb2.UploadHeader(example_count=count, num_elements=N, encoding="float32_delta"),
            delta.astype("<f4").tobytes(),
        )

    np.testing.assert_allclose(aggregator.finalize()[0], plain.finalize()[0], atol=1e-7)


def test_unweighted_mean_ignores_example_counts() -> None:
    aggregator = _round(_process("unweighted_mean"))
    a, b = np.ones(N, np.float32), np.zeros(N, np.float32)

    _upload(aggregator, a, 1)
    _upload(aggregator, b, 99)

    np.testing.assert_allclose(aggregator.finalize()[0], 0.5)


def test_compressed_mean_is_close_to_the_exact_mean() -> None:
    deltas = _deltas(10)
    exact = np.mean(deltas, axis=0)
    aggregator = _round(_process("mean(uniform(bits=8, threshold=100))"))

    for delta in deltas:
        _upload(aggregator, delta)
    mean, metrics = aggregator.finalize()

    assert np.sum((mean - exact) ** 2) / np.sum(exact**2) < 1e-3
    assert 8.0 < metrics["aggregator/codec/payload_bits_per_parameter"] < 8.3


def test_merge_of_shards_equals_sequential_accumulation() -> None:
    process = _process("compression_aggregator(zeroing=false, clipping=false)")
    whole = _round(process)
    left = EncodedRoundAggregator(
        whole.config, SIZES, whole.codec.seed, whole.state, np.random.default_rng()
    )
    right = EncodedRoundAggregator(
        whole.config, SIZES, whole.codec.seed, whole.state, np.random.default_rng()
    )

    for i, delta in enumerate(_deltas(4)):
        _upload(whole, delta, i + 1)
        _upload(left if i % 2 else right, delta, i + 1)
    left.merge(right)

    np.testing.assert_allclose(left.finalize()[0], whole.finalize()[0], atol=1e-6)
    assert left.count == whole.count == 4


def test_non_finite_update_is_counted_with_weight_zero() -> None:
    aggregator = _round(_process("mean(sign)"))
    poisoned = np.full(N, 1.0, np.float32)
    poisoned[7] = np.nan

    _upload(aggregator, poisoned, 1000)
    _upload(aggregator, np.zeros(N, np.float32), 10)
    mean, metrics = aggregator.finalize()

    assert np.all(np.isfinite(mean)) and np.allclose(mean, 0.0)
    assert metrics["aggregator/num_reports"] == 2
    assert metrics["aggregator/num_nonfinite_updates"] == 1
    assert metrics["aggregator/total_weight"] == 10


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, p: (_with(h, encoding="float32_delta"), p), "not this round's"),
        (lambda h, p: (_with(h, num_elements=N + 1), p), "elements"),
        (lambda h, p: (_with(h, example_count=0), p), "example_count"),
        (lambda h, p: (h, p[:-1]), "bytes"),
        (lambda h, p: (h, b"\x07" + p[1:]), "format"),
        (lambda h, p: (h, p[:-1] + b"\xff"), "corrupt"),
    ],
)
def test_bad_update_is_refused_and_changes_nothing(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    aggregator = _round(_process("mean(uniform(bits=3, threshold=0))"))
    _upload(aggregator, _deltas(1)[0])
    before = aggregator.finalize()[0]
    spec = ClientAggregationSpec.from_proto(aggregator.client_spec())
    payload = encode_update(spec, np.ones(N, np.float32), np.random.default_rng(0))
    header, bad_payload = mutate(_header(), payload)

    with pytest.raises(InvalidArgument, match=message):
        aggregator.accumulate(header, bad_payload)

    assert aggregator.count == 1
    np.testing.assert_array_equal(aggregator.finalize()[0], before)


def _with(header: device_pb2.UploadHeader, **fields: object) -> device_pb2.UploadHeader:
    copy = device_pb2.UploadHeader()
    copy.CopyFrom(header)
    for key, value in fields.items():
        setattr(copy, key, value)
    return copy


def test_flags_the_round_never_sets_are_refused() -> None:
    aggregator = _round(_process("mean(uniform)"))
    payload = bytearray(
        encode_update(
            ClientAggregationSpec.from_proto(aggregator.client_spec()),
            np.zeros(N, np.float32),
            np.random.default_rng(0),
        )
    )
    payload[1] = 1  # ZEROED, but this round has no zeroing

    with pytest.raises(InvalidArgument, match="never sets"):
        aggregator.accumulate(_header(), bytes(payload))
    assert aggregator.count == 0


def test_adaptive_clipping_follows_the_geometric_update_and_survives_a_checkpoint() -> None:
    process = _process("robust_aggregator(zeroing=false)")
    aggregator = _round(process)
    deltas = [np.full(N, v / math.sqrt(N), np.float32) for v in (0.5, 0.5, 2.0, 3.0)]

    for delta in deltas:  # L2 norms 0.5, 0.5, 2, 3 against the initial clip 1.0
        _upload(aggregator, delta)
    _, metrics = aggregator.finalize()

    expected = 1.0 * math.exp(-0.2 * (2 / 4 - 0.8))
    assert metrics["aggregator/clipping/clipping_norm"] == 1.0
    assert metrics["aggregator/clipping/clipped_count"] == 2
    assert process.state["clipping_estimate"] == pytest.approx(expected)
    restarted = _process("robust_aggregator(zeroing=false)")
    restarted.restore(metrics)
    assert restarted.state == process.state
    assert _round(restarted).client.clipping.bound == pytest.approx(expected)  # type: ignore[union-attr]


def test_adaptive_zeroing_starts_at_21_and_zeroes_outliers() -> None:
    process = _process("robust_aggregator(clipping=false)")
    aggregator = _round(process)
    outlier = np.zeros(N, np.float32)
    outlier[0] = 50.0  # infinity norm 50 > 2 * 10 + 1

    _upload(aggregator, outlier)
    _upload(aggregator, np.full(N, 0.1, np.float32))
    mean, metrics = aggregator.finalize()

    assert metrics["aggregator/zeroing/zeroing_norm"] == 21.0
    assert metrics["aggregator/zeroing/zeroed_count"] == 1
    np.testing.assert_allclose(mean, 0.05, rtol=1e-6)  # weight kept: pulled toward 0 (TFF)


def test_dp_noise_and_privacy_spent_are_reported_each_round() -> None:
    expression = "dp(noise_multiplier=1.0, clients_per_round=4, clip=0.5)"
    process = _process(expression)
    epsilons = []

    for _ in range(2):
        aggregator = _round(process)
        for delta in _deltas(4, scale=1.0):
            _upload(aggregator, delta)
        mean, metrics = aggregator.finalize()
        epsilons.append(metrics["aggregator/dp/epsilon"])

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert epsilons[1] == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilons[0] < epsilons[1]
    assert metrics["aggregator/dp/noise_stddev"] == 0.5
    assert metrics["aggregator/dp/clipped_count"] == 4
    # Clipped to 0.5 each and divided by 4: the noise (0.5 / 4 per coordinate) dominates.
    assert np.std(mean) == pytest.approx(0.125, rel=0.1)
    assert process.state["dp_rounds"] == 2


def test_adaptive_dp_clip_moves_toward_the_target_quantile() -> None:
    process = _process("dp_aggregator(noise_multiplier=0.1, clients_per_round=10)", seed=1)
    aggregator = _round(process)

    for delta in _deltas(10, scale=1.0):  # every norm ~ 72 > 0.1: nobody below the estimate
        _upload(aggregator, delta)
    aggregator.finalize()

    assert process.state["dp_clip"] > 0.1  # the clip grows toward the median norm


def _nan_update() -> np.ndarray:
    update = np.full(N, 0.5, np.float32)
    update[11] = np.nan
    return update


def test_non_finite_update_votes_below_every_adaptive_estimate() -> None:
    process = _process("robust_aggregator()")
    aggregator = _round(process)
    above_clip = np.full(N, 2.0 / math.sqrt(N), np.float32)  # L2 norm 2 > clip 1

    for _ in range(3):
        _upload(aggregator, above_clip)
    _upload(aggregator, _nan_update())  # what TFF's client sends: zeros, weight 0
    mean, metrics = aggregator.finalize()

    # Clipping: 1 of 4 below (the zeros); zeroing: 4 of 4 below (TFF counts every client).
    assert process.state["clipping_estimate"] == pytest.approx(math.exp(-0.2 * (1 / 4 - 0.8)))
    assert process.state["zeroing_estimate"] == pytest.approx(10 * math.exp(-math.log(10) * 0.02))
    assert metrics["aggregator/clipping/clipped_count"] == 3
    assert metrics["aggregator/total_weight"] == 30  # the non-finite update weighs 0
    np.testing.assert_allclose(mean, 1.0 / math.sqrt(N), rtol=1e-5)  # three clipped to norm 1


def test_non_finite_update_is_one_client_of_an_unweighted_mean() -> None:
    aggregator = _round(_process("unweighted_mean"))

    _upload(aggregator, np.ones(N, np.float32))
    _upload(aggregator, _nan_update())
    mean, metrics = aggregator.finalize()

    np.testing.assert_allclose(mean, 0.5)  # TFF's unweighted FedAvg ignores the weight 0
    assert metrics["aggregator/num_nonfinite_updates"] == 1


def test_dp_without_noise_is_deterministic_with_tffs_clipped_count() -> None:
    expression = "dp_aggregator(noise_multiplier=0, clients_per_round=4)"
    runs = []
    for seed in (1, 2):  # different generators: nothing random may remain
        process = _process(expression, seed=seed)
        aggregator = _round(process)
        for delta in _deltas(3, scale=1.0):  # norms ~ 72: above the clip 0.1
            _upload(aggregator, delta)
        _upload(aggregator, np.full(N, 0.0001, np.float32))  # norm ~ 0.007: below it
        runs.append((*aggregator.finalize(), process.state["dp_clip"]))

    (mean_1, metrics_1, clip_1), (mean_2, _, clip_2) = runs
    np.testing.assert_array_equal(mean_1, mean_2)
    assert clip_1 == clip_2 == pytest.approx(0.1 * math.exp(-0.2 * (1 / 4 - 0.5)))
    assert metrics_1["aggregator/dp/noise_stddev"] == 0


def test_dp_reports_the_clip_it_applied_and_the_next_rounds() -> None:
    process = _process("dp_aggregator(noise_multiplier=0, clients_per_round=2)")

    first = _round(process)
    for delta in _deltas(2, scale=1.0):
        _upload(first, delta)
    _, metrics = first.finalize()
    second = _round(process)

    assert metrics["aggregator/dp/clip_applied"] == 0.1
    # TFF's `dp_query_metrics/clip`: the clip after this round's update.
    assert metrics["aggregator/dp/next_clip"] == pytest.approx(0.1 * math.exp(0.2 * 0.5))
    assert second.client.clipping is not None
    assert second.client.clipping.bound == metrics["aggregator/dp/next_clip"]
