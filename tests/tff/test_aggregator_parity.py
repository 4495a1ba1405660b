"""Overnight's aggregator presets compute what TensorFlow Federated 0.87's own aggregators compute.

The same client updates (10 clients, 8 rounds; outliers in three rounds, or non-finite updates
in three rounds) go once through a TFF aggregation process and once through Overnight's client
half (device_runtime/aggregation) and server half (server/aggregators), round after round, each
side keeping its own adaptive state. TFF is given what its FedAvg client sends: a non-finite
delta zeroed with weight 0, and unweighted factories wrapped as `build_unweighted_fed_avg`
wraps them (`as_weighted_aggregator`, which drops the weight). Every norm, count and mean
matches to float32 rounding; 8-bit compression, whose randomness is each side's own, matches
statistically.

TFF's measurements and the metrics they correspond to are `TFF_METRICS` below (also in the
README). TFF's DP `clip` is the clip the *next* round uses: ours is `aggregator/dp/next_clip`,
and `aggregator/dp/clip_applied` is the clip this round applied.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.learning import client_weight_lib, tensor_utils
from tensorflow_federated.python.learning.templates import model_delta_client_work

from device_runtime import constants
from device_runtime.aggregation.client import ClientAggregationSpec, encode_update
from protos import device_pb2
from server.aggregators.presets import parse_aggregator
from server.aggregators.process import AggregationProcess
from server.aggregators.round_aggregator import EncodedRoundAggregator

# One tensor above compression_aggregator()'s 20,000-element threshold: it is quantized.
SIZES = (3000, 30, 25_000, 10)
CLIENTS = 10
ROUNDS = 8
SPECIAL_ROUNDS = (1, 4, 6)  # rounds with outliers, or with non-finite updates
SEED = 2026

# TFF measurement (leaf name) -> Overnight round metric.
TFF_METRICS = {
    "zeroing_norm": "aggregator/zeroing/zeroing_norm",
    "zeroed_count": "aggregator/zeroing/zeroed_count",
    "clipping_norm": "aggregator/clipping/clipping_norm",
    "clipped_count": "aggregator/clipping/clipped_count",
    "clip": "aggregator/dp/next_clip",  # dp_query_metrics/clip
}
COUNTS = ("zeroed_count", "clipped_count")

# Differences left by float32 arithmetic in a different order (TensorFlow's norms and sums
# against numpy's): relative for norms, absolute for means (entries are ~1e-2 at most).
NORM_RTOL = 1e-5
MEAN_ATOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Cohort:
    """One round's clients: their updates (flat float32) and example counts."""

    deltas: list[np.ndarray]
    example_counts: list[int]


@dataclasses.dataclass(frozen=True)
class RoundOutput:
    mean: np.ndarray
    measurements: dict[str, float]  # by TFF's leaf names


def _cohorts(scenario: str) -> list[Cohort]:
    """Clients whose update norms spread around the default clips (log-normal, median 0.5).

    "outliers": in each special round one client's update has a spike of 1000 (above any
    zeroing bound) and two are 20 times larger than usual (clipped, not zeroed).
    "non_finite": in each special round two clients' updates hold a NaN or an infinity.
    """
    rng = np.random.default_rng(SEED)
    n = sum(SIZES)
    cohorts = []
    for round_index in range(ROUNDS):
        norms = np.exp(rng.normal(np.log(0.5), 1.0, CLIENTS))
        directions = rng.standard_normal((CLIENTS, n))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        deltas = [(norm * d).astype(np.float32) for norm, d in zip(norms, directions, strict=True)]
        if round_index in SPECIAL_ROUNDS:
            first, second, third = rng.choice(CLIENTS, 3, replace=False)
            if scenario == "outliers":
                deltas[first][int(rng.integers(n))] = 1000.0
                deltas[second] *= 20
                deltas[third] *= 20
            else:
                assert scenario == "non_finite"
                deltas[first][int(rng.integers(n))] = np.nan
                deltas[second][int(rng.integers(n))] = np.inf
        counts = [int(c) for c in rng.integers(5, 60, CLIENTS)]
        cohorts.append(Cohort(deltas, counts))
    return cohorts


def _tensors(flat: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(SIZES)[:-1])


def _leaves(measurements: object) -> Iterator[tuple[str, float]]:
    if isinstance(measurements, Mapping):
        for key, value in measurements.items():
            if isinstance(value, Mapping):
                yield from _leaves(value)
            elif key in TFF_METRICS:
                yield key, float(value)


def _run_tff(
    factory: tff.aggregators.AggregationFactory, cohorts: list[Cohort]
) -> list[RoundOutput]:
    if isinstance(factory, tff.aggregators.UnweightedAggregationFactory):
        factory = tff.aggregators.as_weighted_aggregator(factory)  # as build_unweighted_fed_avg
    value_type = tff.types.to_type([(np.float32, (size,)) for size in SIZES])
    process = factory.create(value_type, tff.types.TensorType(np.float32))
    state = process.initialize()
    outputs = []
    for cohort in cohorts:
        values, weights = [], []
        for delta, count in zip(cohort.deltas, cohort.example_counts, strict=True):
            # What TFF's FedAvg client (model_delta_client_work) sends for this delta.
            update, non_finite = tensor_utils.zero_all_if_any_non_finite(_tensors(delta))
            weight = model_delta_client_work._choose_client_weight(
                client_weight_lib.ClientWeighting.NUM_EXAMPLES, non_finite, count
            )
            values.append([np.asarray(t) for t in update])
            weights.append(float(weight))
        output = process.next(state, values, weights)
        state = output.state
        mean = np.concatenate([np.asarray(t).ravel() for t in output.result])
        outputs.append(RoundOutput(mean, dict(_leaves(output.measurements))))
    return outputs


def _run_overnight(expression: str, cohorts: list[Cohort]) -> list[RoundOutput]:
    rng = np.random.default_rng(SEED)
    process = AggregationProcess(parse_aggregator(expression), SIZES, rng)
    outputs = []
    for cohort in cohorts:
        aggregator = process.start_round()
        assert isinstance(aggregator, EncodedRoundAggregator)
        spec = ClientAggregationSpec.from_proto(aggregator.client_spec())
        for delta, count in zip(cohort.deltas, cohort.example_counts, strict=True):
            header = device_pb2.UploadHeader(
                example_count=count,
                num_elements=delta.size,
                encoding=constants.UPDATE_ENCODING_V1,
            )
            aggregator.accumulate(header, encode_update(spec, delta, rng))
        mean, metrics = aggregator.finalize()
        measured = {
            tff_name: metrics[ours] for tff_name, ours in TFF_METRICS.items() if ours in metrics
        }
        if "aggregator/dp/clip_applied" in metrics:
            measured["clip_applied"] = metrics["aggregator/dp/clip_applied"]
        outputs.append(RoundOutput(mean, measured))
    return outputs


# (TFF factory, Overnight expression): the presets that must match exactly.
EXACT_PRESETS = {
    "robust": (lambda: tff.learning.robust_aggregator(), "robust_aggregator()"),
    "robust_zeroing_only": (
        lambda: tff.learning.robust_aggregator(clipping=False),
        "robust_aggregator(clipping=false)",
    ),
    "robust_clipping_only": (
        lambda: tff.learning.robust_aggregator(zeroing=False),
        "robust_aggregator(zeroing=false)",
    ),
    "robust_unweighted": (
        lambda: tff.learning.robust_aggregator(weighted=False),
        "robust_aggregator(weighted=false)",
    ),
    "dp_noise_0": (
        lambda: tff.learning.dp_aggregator(noise_multiplier=0.0, clients_per_round=CLIENTS),
        f"dp_aggregator(noise_multiplier=0, clients_per_round={CLIENTS})",
    ),
}


@pytest.fixture(scope="module")
def cohorts() -> dict[str, list[Cohort]]:
    return {scenario: _cohorts(scenario) for scenario in ("outliers", "non_finite")}


@pytest.fixture(scope="module")
def tff_runs(cohorts: dict[str, list[Cohort]]) -> dict[tuple[str, str], list[RoundOutput]]:
    """TFF's rounds per (preset, scenario), computed once (each TFF process costs seconds)."""
    return {
        (preset, scenario): _run_tff(build(), rounds)
        for preset, (build, _) in EXACT_PRESETS.items()
        for scenario, rounds in cohorts.items()
    }


@pytest.mark.parametrize("scenario", ["outliers", "non_finite"])
@pytest.mark.parametrize("preset", sorted(EXACT_PRESETS))
def test_preset_matches_tff_round_by_round(
    preset: str,
    scenario: str,
    cohorts: dict[str, list[Cohort]],
    tff_runs: dict[tuple[str, str], list[RoundOutput]],
) -> None:
    theirs = tff_runs[preset, scenario]

    ours = _run_overnight(EXACT_PRESETS[preset][1], cohorts[scenario])

    _assert_same_bounds(ours, theirs)
    assert _max_mean_difference(ours, theirs) <= MEAN_ATOL


def _assert_same_bounds(ours: list[RoundOutput], theirs: list[RoundOutput]) -> None:
    """The same measurements each round: counts equal, norms to float32 rounding."""
    for round_index, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        assert set(o.measurements) - {"clip_applied"} == set(t.measurements), round_index
        for name, value in t.measurements.items():
            if name in COUNTS:
                assert o.measurements[name] == value, (round_index, name)
            else:
                assert o.measurements[name] == pytest.approx(value, rel=NORM_RTOL), name


def _max_mean_difference(
    ours: list[RoundOutput], theirs: list[RoundOutput], where: slice = slice(None)
) -> float:
    return max(
        float(np.max(np.abs(o.mean[where] - t.mean[where])))
        for o, t in zip(ours, theirs, strict=True)
    )


@pytest.mark.parametrize("scenario", ["outliers", "non_finite"])
def test_compression_aggregator_matches_tff_statistically(
    scenario: str,
    cohorts: dict[str, list[Cohort]],
    tff_runs: dict[tuple[str, str], list[RoundOutput]],
) -> None:
    """Both quantize after zeroing and clipping, so the bounds match exactly and the mean of
    robust_aggregator() is the unquantized reference. Both quantize stochastically to 8 bits
    (unbiased, error variance ~ step^2 / 6 per coordinate): over 8 rounds of 25,000
    coordinates the error energies agree to about 1% (seen: 0.3-0.7%), so 10% apart fails
    only if the quantizers differ (7 bits would be 4x, deterministic rounding about 0.5x)."""
    exact = tff_runs["robust", scenario]
    theirs = _run_tff(tff.learning.compression_aggregator(), cohorts[scenario])

    ours = _run_overnight("compression_aggregator()", cohorts[scenario])

    _assert_same_bounds(ours, theirs)
    quantized = slice(SIZES[0] + SIZES[1], SIZES[0] + SIZES[1] + SIZES[2])
    for unquantized in (slice(None, quantized.start), slice(quantized.stop, None)):
        assert _max_mean_difference(ours, exact, unquantized) <= MEAN_ATOL
    ours_error = [o.mean[quantized] - e.mean[quantized] for o, e in zip(ours, exact, strict=True)]
    tff_error = [t.mean[quantized] - e.mean[quantized] for t, e in zip(theirs, exact, strict=True)]
    energy_ratio = sum(float(np.sum(e**2)) for e in ours_error) / sum(
        float(np.sum(e**2)) for e in tff_error
    )
    assert 0.9 <= energy_ratio <= 1.1
    for error in ours_error:  # unbiased: the average error within 5 standard errors of 0
        assert abs(float(np.mean(error))) <= 5 * float(np.std(error)) / np.sqrt(error.size)


def test_scenarios_exercise_every_stage(
    tff_runs: dict[tuple[str, str], list[RoundOutput]],
) -> None:
    """Guards the parity above from passing vacuously: TFF itself zeroes and clips, and its
    adaptive bounds move, in the rounds the scenarios build."""
    robust = tff_runs["robust", "outliers"]
    dp = tff_runs["dp_noise_0", "non_finite"]

    zeroed = [r.measurements["zeroed_count"] for r in robust]
    clipped = [r.measurements["clipped_count"] for r in robust]
    assert [i for i, z in enumerate(zeroed) if z] == list(SPECIAL_ROUNDS)
    assert sum(clipped) > 0 and max(clipped) < CLIENTS
    for runs, name in ((robust, "clipping_norm"), (robust, "zeroing_norm"), (dp, "clip")):
        bounds = [r.measurements[name] for r in runs]
        assert sum(a != b for a, b in itertools.pairwise(bounds)) >= ROUNDS // 2, name


def test_dp_clip_applied_is_tffs_clip_of_the_round_before(
    cohorts: dict[str, list[Cohort]],
    tff_runs: dict[tuple[str, str], list[RoundOutput]],
) -> None:
    theirs = tff_runs["dp_noise_0", "outliers"]

    ours = _run_overnight(EXACT_PRESETS["dp_noise_0"][1], cohorts["outliers"])

    initial_clip = 0.1  # DifferentiallyPrivateFactory.gaussian_adaptive's default
    before = [initial_clip] + [t.measurements["clip"] for t in theirs[:-1]]
    applied = [o.measurements["clip_applied"] for o in ours]
    np.testing.assert_allclose(applied, before, rtol=NORM_RTOL)
