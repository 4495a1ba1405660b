"""The coordinator zeroes and clips decoded updates itself, whatever the device's flags say."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime import constants
from device_runtime.aggregation.client import ClientAggregationSpec, encode_update
from device_runtime.aggregation.codec import UpdateFlags
from protos import device_pb2
from server.aggregators.presets import parse_aggregator
from server.aggregators.process import AggregationProcess
from server.aggregators.round_aggregator import EncodedRoundAggregator

# One tensor above the codecs' threshold (compressed), small ones below it (sent exact).
SIZES = (40_000, 30, 10)
N = sum(SIZES)
NO_FLAGS = UpdateFlags(0)
HONEST_SCALE = 0.001  # honest deltas: norm ~0.2, under every default bound


def _round(expression: str) -> EncodedRoundAggregator:
    process = AggregationProcess(parse_aggregator(expression), SIZES, np.random.default_rng(0))
    aggregator = process.start_round()
    assert isinstance(aggregator, EncodedRoundAggregator)
    return aggregator


def _header(count: int = 10) -> device_pb2.UploadHeader:
    return device_pb2.UploadHeader(
        example_count=count, num_elements=N, encoding=constants.UPDATE_ENCODING_V1
    )


def _honest(aggregator: EncodedRoundAggregator, delta: np.ndarray, count: int = 10) -> None:
    """Runs the real client half (zeroing, clipping, flags) before encoding."""
    spec = ClientAggregationSpec.from_proto(aggregator.client_spec())
    payload = encode_update(spec, delta.astype(np.float32), np.random.default_rng(count))
    aggregator.accumulate(_header(count), payload)


def _unclipped(
    aggregator: EncodedRoundAggregator,
    delta: np.ndarray,
    flags: UpdateFlags = NO_FLAGS,
    count: int = 10,
) -> None:
    """A malicious device: encodes the raw delta, skipping zeroing and clipping."""
    codec = aggregator.codec
    payload = codec.encode(
        delta.astype(np.float32), flags, codec.uniform_draws(np.random.default_rng(1))
    )
    aggregator.accumulate(_header(count), payload)


def _honest_deltas(k: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [(HONEST_SCALE * rng.standard_normal(N)).astype(np.float32) for _ in range(k)]


def test_robust_aggregator_zeroes_an_unclipped_huge_update_itself() -> None:
    aggregator = _round("robust_aggregator()")
    for delta in _honest_deltas(3):
        _honest(aggregator, delta)
    honest_only = _round("robust_aggregator()")
    for delta in _honest_deltas(3):
        _honest(honest_only, delta)

    _unclipped(aggregator, np.full(N, 1e30, np.float32))
    mean, metrics = aggregator.finalize()

    assert np.all(np.isfinite(mean)) and float(np.abs(mean).max()) < 0.01
    assert metrics["aggregator/zeroing/zeroed_count"] == 1
    assert metrics["aggregator/zeroing/enforced_count"] == 1
    # Zeroed, its weight still counts (TFF's zeroing_factory): the honest mean times 3/4.
    assert np.allclose(mean, honest_only.finalize()[0] * 3 / 4, atol=1e-6)


@pytest.mark.parametrize(
    "expression",
    [
        "robust_aggregator(zeroing=false)",
        "compression_aggregator(zeroing=false)",
        "zeroing(norm=1e6, clipping(norm=1, mean(uniform(bits=4, rotation=true))))",
        "one_bit_aggregator(zeroing=false)",
        "zeroing(norm=1e6, clipping(norm=1, mean(top_k(fraction=0.1))))",
    ],
)
def test_an_unclipped_update_is_clipped_to_the_bound_and_counted(expression: str) -> None:
    aggregator = _round(expression)
    assert aggregator.client.clipping is not None
    bound = aggregator.client.clipping.bound
    poisoned = np.full(N, 1000.0, np.float32)

    _unclipped(aggregator, poisoned)
    mean, metrics = aggregator.finalize()

    # One update, so the mean is that update after the server's clipping (plus codec noise,
    # which for the lossy codecs the server's allowance tolerates: at most 1.5x for 1 bit).
    assert np.linalg.norm(mean) <= 1.6 * bound
    assert metrics["aggregator/clipping/clipped_count"] == 1
    assert metrics["aggregator/clipping/enforced_count"] == 1


@pytest.mark.parametrize(
    "expression",
    [
        "robust_aggregator()",
        "compression_aggregator()",
        "one_bit_aggregator()",
        "zeroing(clipping(mean(uniform(bits=2, rotation=true))))",
        "zeroing(norm_order=1, clipping(mean(uniform(bits=8))))",
        "dp_aggregator(noise_multiplier=0.5, clients_per_round=100)",
    ],
)
def test_honest_updates_are_never_clipped_or_zeroed_by_the_server(expression: str) -> None:
    aggregator = _round(expression)
    deltas = _honest_deltas(3)
    deltas.append(100 * deltas[0])  # clipped (and for some, zeroed) by the device itself

    for delta in deltas:
        _honest(aggregator, delta)
    _, metrics = aggregator.finalize()

    enforced = [v for k, v in metrics.items() if k.endswith("/enforced_count")]
    assert enforced and all(v == 0 for v in enforced)


def test_dp_clips_at_exactly_the_sensitivity() -> None:
    aggregator = _round("dp(noise_multiplier=0, clients_per_round=1, clip=0.5)")

    _unclipped(aggregator, np.full(N, 3.0, np.float32))
    mean, metrics = aggregator.finalize()

    assert np.linalg.norm(mean) == pytest.approx(0.5, rel=1e-5)
    assert metrics["aggregator/dp/enforced_count"] == 1


def test_a_false_below_estimate_vote_is_not_counted() -> None:
    lied = _round("robust_aggregator(zeroing=false)")
    honest = _round("robust_aggregator(zeroing=false)")
    big = np.full(N, 1.0, np.float32)  # L2 norm 200, far above the estimate of 1

    _unclipped(lied, big, UpdateFlags.BELOW_CLIPPING_ESTIMATE)
    _unclipped(honest, big)

    assert _next_state(lied) == _next_state(honest)
    assert _next_state(lied)["clipping_estimate"] > 1.0  # the estimate moved up, as it should


def test_a_false_zeroed_claim_is_not_counted_and_the_update_still_clipped() -> None:
    aggregator = _round("robust_aggregator()")

    _unclipped(aggregator, np.full(N, 0.5, np.float32), UpdateFlags.ZEROED)
    mean, metrics = aggregator.finalize()

    assert metrics["aggregator/zeroing/zeroed_count"] == 0
    assert metrics["aggregator/clipping/enforced_count"] == 1
    assert np.linalg.norm(mean) == pytest.approx(1.0, rel=1e-5)


def _next_state(aggregator: EncodedRoundAggregator) -> dict[str, float]:
    _, metrics = aggregator.finalize()
    prefix = "aggregator_state/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def test_without_clipping_a_rotated_codecs_outlier_is_zeroed_on_its_exact_inf_norm() -> None:
    """Zeroing is then the only bound, so the server undoes the rotation to measure it."""
    aggregator = _round("one_bit_aggregator(clipping=false)")
    outlier = np.zeros(N, np.float32)
    outlier[123] = 1e4  # inf norm 1e4, far above the zeroing bound of 21

    _unclipped(aggregator, outlier)
    mean, metrics = aggregator.finalize()

    assert metrics["aggregator/zeroing/enforced_count"] == 1
    assert not np.any(mean)


def test_with_clipping_a_rotated_codecs_outlier_is_at_least_clipped() -> None:
    """Its exact inf norm would cost an inverse rotation per update; the clip bounds it."""
    aggregator = _round("one_bit_aggregator()")
    assert aggregator.client.clipping is not None
    outlier = np.zeros(N, np.float32)
    outlier[123] = 1e4

    _unclipped(aggregator, outlier)
    mean, metrics = aggregator.finalize()

    enforced = metrics["aggregator/zeroing/enforced_count"]
    enforced += metrics["aggregator/clipping/enforced_count"]
    assert enforced == 1
    assert np.linalg.norm(mean) <= 1.6 * aggregator.client.clipping.bound


def test_non_finite_upload_counts_as_a_zero_update_whatever_its_flags_claim() -> None:
    aggregator = _round("robust_aggregator()")
    zero_update = _round("robust_aggregator()")
    claims = UpdateFlags.ZEROED | UpdateFlags.CLIPPED
    poisoned = np.full(N, 1.0, np.float32)
    poisoned[3] = np.inf

    _unclipped(aggregator, poisoned, flags=claims, count=1000)
    _honest(zero_update, np.zeros(N, np.float32), count=1000)
    _, metrics = aggregator.finalize()
    _, zero_metrics = zero_update.finalize()

    # Not zeroed, not clipped, below both estimates: the votes of an honest zero update, with
    # weight 0 where the zero update has its example count.
    for name in ("zeroing/zeroed_count", "clipping/clipped_count"):
        assert metrics[f"aggregator/{name}"] == zero_metrics[f"aggregator/{name}"] == 0
    for name in ("zeroing_estimate", "clipping_estimate"):
        state = f"aggregator_state/{name}"
        assert metrics[state] == zero_metrics[state]
    assert metrics["aggregator/total_weight"] == 0
    assert zero_metrics["aggregator/total_weight"] == 1000
