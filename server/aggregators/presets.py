"""Presets with TFF's names and defaults, and the composition stages, from an expression.

TFF defaults (tensorflow_federated/python/learning/model_update_aggregator.py, v0.87):
- zeroing: adaptive, initial estimate 10, target quantile 0.98, learning rate ln(10), bound
  2 * estimate + 1, infinity norm;
- clipping: adaptive L2, initial estimate 1, target quantile 0.8, learning rate 0.2;
- compression: 8-bit stochastic uniform quantization of tensors over 20,000 elements;
- dp_aggregator: zeroing(gaussian_adaptive(noise_multiplier, clients_per_round)), unweighted;
  its clipped count is noised with stddev 0.05 * clients_per_round, or not at all when the
  noise multiplier is 0 (DpConfig.count_stddev);
- secure_aggregator: TFF's is adaptive zeroing and adaptive clipping around a secure sum. Ours
  clips with a fixed bound (default 1, TFF's initial clipping estimate) and has no zeroing:
  adapting a bound needs the devices' votes secure-summed too, which is not built yet.
"""

from __future__ import annotations

import dataclasses
import math

from device_runtime.aggregation.codec_spec import FLOAT32, SIGN, TOP_K, UNIFORM, CodecSpec
from server.aggregators.config import (
    AggregatorConfig,
    DpConfig,
    NormStageConfig,
    QuantileEstimatorConfig,
    SecureSumConfig,
)
from server.aggregators.expression import Call, ExpressionError, parse_call

TFF_ZEROING = QuantileEstimatorConfig(10.0, 0.98, math.log(10.0), multiplier=2.0, increment=1.0)
TFF_CLIPPING = QuantileEstimatorConfig(1.0, 0.8, 0.2)
DEFAULT_AGGREGATOR = "mean"


def robust_aggregator(
    zeroing: bool = True, clipping: bool = True, weighted: bool = True
) -> AggregatorConfig:
    return AggregatorConfig(
        weighted=weighted,
        zeroing=NormStageConfig(adaptive=TFF_ZEROING, norm_order=math.inf) if zeroing else None,
        clipping=NormStageConfig(adaptive=TFF_CLIPPING) if clipping else None,
    )


def compression_aggregator(
    zeroing: bool = True, clipping: bool = True, weighted: bool = True
) -> AggregatorConfig:
    robust = robust_aggregator(zeroing, clipping, weighted)
    return dataclasses.replace(robust, codec=CodecSpec(UNIFORM, bits=8, threshold=20000))


def dp_aggregator(
    noise_multiplier: float, clients_per_round: float, zeroing: bool = True
) -> AggregatorConfig:
    return AggregatorConfig(
        weighted=False,
        zeroing=NormStageConfig(adaptive=TFF_ZEROING, norm_order=math.inf) if zeroing else None,
        dp=DpConfig(noise_multiplier, clients_per_round),
    )


def one_bit_aggregator(
    keep_fraction: float = 0.95,
    threshold: int = 0,
    zeroing: bool = True,
    clipping: bool = True,
    weighted: bool = True,
) -> AggregatorConfig:
    """Overnight's: TFF's robust wrappers around DRIVE (rotation + 1 bit per kept coordinate)."""
    robust = robust_aggregator(zeroing, clipping, weighted)
    codec = CodecSpec(SIGN, threshold=threshold, keep_fraction=keep_fraction)
    return dataclasses.replace(robust, codec=codec)


def secure_aggregator(
    clip: float = 1.0, max_weight: float = 10_000.0, weighted: bool = True
) -> AggregatorConfig:
    """The mean by real secure aggregation (server/secagg): the coordinator sees only sums."""
    return AggregatorConfig(
        weighted=weighted, secure=SecureSumConfig(clip, max_weight if weighted else 1.0)
    )


def parse_aggregator(expression: str) -> AggregatorConfig:
    """The aggregator an expression describes. Raises ValueError with an actionable message."""
    call = parse_call(expression)
    return _build(call).validate()


def _build(call: Call) -> AggregatorConfig:
    match call.name:
        case "robust_aggregator" | "compression_aggregator":
            preset = (
                robust_aggregator if call.name == "robust_aggregator" else compression_aggregator
            )
            config = preset(
                call.flag("zeroing", True), call.flag("clipping", True), call.flag("weighted", True)
            )
            _no_inner(call)
        case "one_bit_aggregator":
            config = one_bit_aggregator(
                _number(call, "keep_fraction", 0.95),
                call.integer("threshold", 0),
                call.flag("zeroing", True),
                call.flag("clipping", True),
                call.flag("weighted", True),
            )
            _no_inner(call)
        case "secure_aggregator":
            for refused in ("zeroing", "clipping"):
                if call.flag(refused, False):
                    raise ExpressionError(
                        f"secure_aggregator: adaptive {refused} is not supported yet; it clips "
                        "with a fixed bound (clip=...)"
                    )
            config = secure_aggregator(
                _number(call, "clip", 1.0),
                _number(call, "max_weight", 10_000.0),
                call.flag("weighted", True),
            )
            _no_inner(call)
        case "dp_aggregator":
            config = dp_aggregator(
                _required(call, "noise_multiplier"),
                _required(call, "clients_per_round"),
                call.flag("zeroing", True),
            )
            _no_inner(call)
        case "zeroing" | "clipping":
            inner = _inner(call)
            stage = _norm_stage(call)
            if call.name == "zeroing":
                if inner.zeroing is not None:
                    raise ExpressionError("zeroing: nested twice")
                config = dataclasses.replace(inner, zeroing=stage)
            else:
                if inner.zeroing is not None or inner.clipping is not None:
                    raise ExpressionError("clipping: must be inside zeroing, around the mean")
                config = dataclasses.replace(inner, clipping=stage)
        case "mean" | "unweighted_mean":
            codec = _codec(call.inner) if call.inner else CodecSpec()
            config = AggregatorConfig(weighted=call.name == "mean", codec=codec)
        case "dp":
            codec = _codec(call.inner) if call.inner else CodecSpec()
            config = AggregatorConfig(
                weighted=False,
                codec=codec,
                dp=DpConfig(
                    _required(call, "noise_multiplier"),
                    _required(call, "clients_per_round"),
                    fixed_clip=call.number("clip"),
                    initial_l2_norm_clip=_number(call, "initial_clip", 0.1),
                    target_unclipped_quantile=_number(call, "target_quantile", 0.5),
                    learning_rate=_number(call, "learning_rate", 0.2),
                    clipped_count_stddev=call.number("clipped_count_stddev"),
                    target_delta=_number(call, "target_delta", 1e-5),
                ),
            )
        case name if name in (FLOAT32, UNIFORM, SIGN, TOP_K):
            raise ExpressionError(
                f"codec {name!r} must sit inside mean(...), unweighted_mean(...) or dp(...)"
            )
        case name:
            raise ExpressionError(
                f"unknown aggregator {name!r}; presets: robust_aggregator, "
                "compression_aggregator, dp_aggregator, one_bit_aggregator, "
                "secure_aggregator; stages: zeroing, clipping, mean, unweighted_mean, dp"
            )
    call.done()
    return config


def _number(call: Call, key: str, default: float) -> float:
    value = call.number(key, default)
    assert value is not None
    return value


def _required(call: Call, key: str) -> float:
    value = call.number(key)
    if value is None:
        raise ExpressionError(f"{call.name}: {key} is required")
    return value


def _no_inner(call: Call) -> None:
    if call.inner is not None:
        raise ExpressionError(f"{call.name}: a preset takes no inner aggregator")


def _inner(call: Call) -> AggregatorConfig:
    if call.inner is None:
        raise ExpressionError(f"{call.name}: needs an inner aggregator, e.g. {call.name}(mean)")
    return _build(call.inner)


def _norm_stage(call: Call) -> NormStageConfig:
    default = TFF_ZEROING if call.name == "zeroing" else TFF_CLIPPING
    order = _number(call, "norm_order", math.inf if call.name == "zeroing" else 2.0)
    norm = call.number("norm")
    if norm is not None:
        return NormStageConfig(fixed_norm=norm, norm_order=order)
    adaptive = QuantileEstimatorConfig(
        _number(call, "initial_estimate", default.initial_estimate),
        _number(call, "target_quantile", default.target_quantile),
        _number(call, "learning_rate", default.learning_rate),
        _number(call, "multiplier", default.multiplier),
        _number(call, "increment", default.increment),
    )
    return NormStageConfig(adaptive=adaptive, norm_order=order)


def _codec(call: Call) -> CodecSpec:
    if call.inner is not None:
        raise ExpressionError(f"codec {call.name}: takes no inner aggregator")
    match call.name:
        case "float32":
            spec = CodecSpec(FLOAT32)
        case "uniform":
            spec = CodecSpec(
                UNIFORM,
                bits=call.integer("bits", 8),
                threshold=call.integer("threshold", 20000),
                rotation=call.flag("rotation", False),
            )
        case "sign":
            spec = CodecSpec(
                SIGN,
                threshold=call.integer("threshold", 0),
                keep_fraction=_number(call, "keep_fraction", 1.0),
            )
        case "top_k":
            spec = CodecSpec(
                TOP_K,
                threshold=call.integer("threshold", 20000),
                top_k_fraction=_number(call, "fraction", 0.01),
            )
        case name:
            raise ExpressionError(f"unknown codec {name!r}; known: float32, uniform, sign, top_k")
    call.done()
    return spec
