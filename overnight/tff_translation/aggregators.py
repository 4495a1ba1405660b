"""TFF aggregation factories -> Overnight's aggregator, verified against TFF's own builders.

A factory is read stage by stage (zeroing, clipping, mean, the encoded sum, differential
privacy). Each stage's parameters are read from the objects TFF keeps, and then the stage is
rebuilt with TFF's public constructors from those parameters and compared with the user's:
norm estimators by their compiled computations (TFF serializes them deterministically), DP
queries by every attribute. Only an exact match is translated; anything else is refused with
the object's name and what is supported. TFF 0.87 is TFF's final release, so the internals
read here no longer change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import encoded, robust
from tensorflow_federated.python.aggregators import sum_factory as sums

from device_runtime.aggregation.codec_spec import UNIFORM, CodecSpec
from overnight.tff_translation.aggregator_expression import expression_of
from overnight.tff_translation.errors import NotTranslatable
from overnight.tff_translation.execution import translation_context
from server.aggregators.config import (
    AggregatorConfig,
    DpConfig,
    NormStageConfig,
    QuantileEstimatorConfig,
)
from server.aggregators.presets import TFF_CLIPPING, TFF_ZEROING, parse_aggregator

SUPPORTED = (
    "tff.learning.robust_aggregator(...), compression_aggregator(...), dp_aggregator(...), "
    "tff.aggregators.MeanFactory() / UnweightedMeanFactory() (plain sums or "
    "EncodedSumFactory.quantize_above_threshold), DifferentiallyPrivateFactory.gaussian_adaptive "
    "/ gaussian_fixed, and zeroing_factory / clipping_factory around them with a fixed norm or "
    "PrivateQuantileEstimationProcess.no_noise(...); or an Overnight expression such as "
    "'secure_aggregator(clip=1.0)' (Overnight's secure aggregation clips with a fixed bound, "
    "where TFF's secure_aggregator() adapts it)"
)
_KNOWN_ESTIMATES = (TFF_ZEROING, TFF_CLIPPING)


def aggregator_expression(aggregator: object) -> str:
    """The task's aggregator expression for a TFF factory, an expression or None (mean)."""
    if aggregator is None:
        return "mean"
    if isinstance(aggregator, str):
        try:
            parse_aggregator(aggregator)
        except ValueError as exc:
            raise NotTranslatable(aggregator, str(exc), SUPPORTED) from None
        return aggregator
    config = aggregator_config(aggregator)
    expression = expression_of(config)
    assert parse_aggregator(expression) == config, expression
    return expression


def aggregator_config(factory: object) -> AggregatorConfig:
    """Raises NotTranslatable naming the first stage that has no exact counterpart."""
    if not isinstance(
        factory,
        tff.aggregators.WeightedAggregationFactory | tff.aggregators.UnweightedAggregationFactory,
    ):
        raise NotTranslatable(factory, "not a TFF aggregation factory", SUPPORTED)
    with translation_context():  # reading norm estimators runs them; no worker outlives it
        config = _stage(factory)
    try:
        return config.validate()
    except ValueError as exc:
        raise NotTranslatable(factory, str(exc), SUPPORTED) from None


def _stage(factory: Any) -> AggregatorConfig:
    kind = type(factory)
    if kind is tff.aggregators.MeanFactory:
        _require_plain_sum(factory, factory._weight_sum_factory, "its weight sum")
        if factory._no_nan_division:
            raise NotTranslatable(factory, "no_nan_division=True", SUPPORTED)
        return AggregatorConfig(weighted=True, codec=_codec(factory._value_sum_factory))
    if kind is tff.aggregators.UnweightedMeanFactory:
        _require_plain_sum(factory, factory._count_sum_factory, "its count sum")
        return AggregatorConfig(weighted=False, codec=_codec(factory._value_sum_factory))
    if kind is tff.aggregators.DifferentiallyPrivateFactory:
        _require_plain_sum(factory, factory._record_aggregation_factory, "its record sum")
        return AggregatorConfig(weighted=False, dp=_dp(factory))
    if kind.__qualname__.startswith("_make_wrapper.<locals>."):
        return _robust_stage(factory)
    if "secure" in kind.__module__:
        raise NotTranslatable(factory, "TFF's secure sums adapt their bounds", SUPPORTED)
    raise NotTranslatable(factory, "no Overnight stage for this factory", SUPPORTED)


def _cells(function: Any) -> dict[str, Any]:
    names = function.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, function.__closure__ or (), strict=True)}


def _robust_stage(factory: Any) -> AggregatorConfig:
    """zeroing_factory or clipping_factory: TFF builds their classes inside `_make_wrapper`;
    what they wrap lives in the closure of `create`."""
    cells = _cells(type(factory).create)
    shared = _cells(cells["init_fn_impl"])
    make_clip = cells["make_clip_fn"]
    zeroing = make_clip.__qualname__.startswith("zeroing_factory.")
    where = "zeroing_factory" if zeroing else "clipping_factory"
    count = shared["clipped_count_agg_process"]
    plain_count = tff.aggregators.SumFactory().create(tff.to_type(robust.COUNT_TF_TYPE))
    if _serialized(count.next) != _serialized(plain_count.next):
        raise NotTranslatable(
            factory, f"{where} counts with a secure sum (TFF's secure_aggregator)", SUPPORTED
        )
    norm_order = _cells(make_clip)["norm_order"] if zeroing else 2.0
    stage = _norm_stage(shared["clipping_norm_process"], float(norm_order))
    inner = _stage(cells["inner_agg_factory"])
    if zeroing:
        if inner.zeroing is not None:
            raise NotTranslatable(factory, "zeroing nested in zeroing", SUPPORTED)
        return dataclasses.replace(inner, zeroing=stage)
    if inner.zeroing is not None or inner.clipping is not None:
        raise NotTranslatable(
            factory, "clipping must sit inside zeroing, around the mean", SUPPORTED
        )
    return dataclasses.replace(inner, clipping=stage)


def _serialized(computation: Any) -> bytes:
    return bytes(tff.framework.serialize_computation(computation).SerializeToString())


def _same_process(a: Any, b: Any) -> bool:
    return all(
        _serialized(getattr(a, part)) == _serialized(getattr(b, part))
        for part in ("initialize", "next", "report")
    )


def _float32_exact(value: float, known: tuple[float, ...]) -> float:
    """A float32 read back from TFF, as the Python float the user most likely wrote: a known
    default when it rounds to the same float32, else the shortest decimal that does."""
    for candidate in known:
        if np.float32(candidate) == np.float32(value):
            return candidate
    return float(repr(np.float32(value)))


def _norm_stage(process: Any, norm_order: float) -> NormStageConfig:
    """A fixed norm, or TFF's no-noise quantile estimate; rebuilt and compared to be sure."""
    state = process.initialize()
    head = state[0] if isinstance(state, tuple) and state else None
    estimate = getattr(head, "current_estimate", None)
    if estimate is None:
        norm = float(process.report(state))
        if _same_process(process, robust._constant_process(norm)):
            return NormStageConfig(fixed_norm=norm, norm_order=norm_order)
        raise NotTranslatable(process, "an estimation process Overnight does not run", SUPPORTED)

    def exact(value: Any, field: str) -> float:
        return _float32_exact(float(value), tuple(getattr(k, field) for k in _KNOWN_ESTIMATES))

    initial = exact(state[0].current_estimate, "initial_estimate")
    quantile = exact(state[0].target_quantile, "target_quantile")
    rate = exact(state[0].learning_rate, "learning_rate")
    reported = float(process.report(state))
    twice = np.float32(2 * state[0].current_estimate)
    doubled = (state[0]._replace(current_estimate=twice), *state[1:])
    slope = (float(process.report(doubled)) - reported) / float(state[0].current_estimate)
    multiplier = exact(slope, "multiplier")
    increment = exact(reported - slope * float(state[0].current_estimate), "increment")
    if increment == 0.0:
        increment = 0.0  # -0.0 from the arithmetic above
    estimate_config = QuantileEstimatorConfig(initial, quantile, rate, multiplier, increment)
    rebuilt = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial, quantile, rate, multiplier, increment
    )
    if not _same_process(process, rebuilt):
        raise NotTranslatable(
            process,
            "not a no-noise PrivateQuantileEstimationProcess (or one with secure estimation)",
            SUPPORTED,
        )
    return NormStageConfig(adaptive=estimate_config, norm_order=norm_order)


def _require_plain_sum(owner: object, inner: object, what: str) -> None:
    if type(inner) is not sums.SumFactory:
        raise NotTranslatable(owner, f"{what} is {type(inner).__name__}, not SumFactory", SUPPORTED)


def _codec(value_sum: Any) -> CodecSpec:
    if type(value_sum) is sums.SumFactory:
        return CodecSpec()
    if type(value_sum) is encoded.EncodedSumFactory:
        encoder_fn = value_sum._encoder_fn
        if encoder_fn.__qualname__.startswith("EncodedSumFactory.quantize_above_threshold."):
            cells = _cells(encoder_fn)
            if not cells["kwargs"]:
                bits, threshold = int(cells["quantization_bits"]), int(cells["threshold"])
                return CodecSpec(UNIFORM, bits=bits, threshold=threshold)
        raise NotTranslatable(
            value_sum, "only quantize_above_threshold(bits, threshold) encoders", SUPPORTED
        )
    raise NotTranslatable(value_sum, "no Overnight codec for this sum", SUPPORTED)


def _dp(factory: Any) -> DpConfig:
    """gaussian_adaptive or gaussian_fixed, read from the DP query and rebuilt to compare."""
    query = factory._query
    clients = float(query._denominator)
    numerator = query._numerator
    estimator = getattr(numerator, "_quantile_estimator_query", None)
    if estimator is not None:
        count_stddev = float(estimator._below_estimate_query._numerator._stddev)
        value_noise = float(numerator._noise_multiplier)
        noise = 0.0 if value_noise == 0 else (value_noise**-2 + (2 * count_stddev) ** -2) ** -0.5
        noise = float(f"{noise:.12g}")
        config = DpConfig(
            noise,
            clients,
            initial_l2_norm_clip=float(estimator._initial_estimate),
            target_unclipped_quantile=float(estimator._target_quantile),
            learning_rate=float(estimator._learning_rate),
            # TFF's default (0.05 per expected client) stays implicit, as in the preset.
            clipped_count_stddev=None if count_stddev == 0.05 * clients else count_stddev,
        )
        rebuilt = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise,
            clients,
            config.initial_l2_norm_clip,
            config.target_unclipped_quantile,
            config.learning_rate,
            count_stddev,
        )
    else:
        clip = float(numerator._l2_norm_clip)
        noise = float(f"{float(numerator._stddev) / clip:.12g}")
        config = DpConfig(noise, clients, fixed_clip=clip)
        rebuilt = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(noise, clients, clip)
    if not _same_query(query, rebuilt._query) or not getattr(estimator, "_geometric_update", True):
        raise NotTranslatable(factory, "a DP query other than TFF's Gaussian ones", SUPPORTED)
    return config


def _same_query(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float | int):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    if not hasattr(a, "__dict__"):
        return bool(a == b)
    va, vb = vars(a), vars(b)
    return va.keys() == vb.keys() and all(_same_query(va[k], vb[k]) for k in va)
