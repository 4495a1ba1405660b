"""An AggregatorConfig written back as the expression that parses to it (TensorFlow-free).

`parse_aggregator(expression_of(config)) == config` for every valid config: every parameter
is written out, floats in their shortest exact form (repr), so nothing is left to defaults.
"""

from __future__ import annotations

import math

from device_runtime.aggregation.codec_spec import FLOAT32, SIGN, TOP_K, UNIFORM, CodecSpec
from server.aggregators.config import AggregatorConfig, DpConfig, NormStageConfig


def expression_of(config: AggregatorConfig) -> str:
    if config.secure is not None:
        secure = config.secure
        return (
            f"secure_aggregator(clip={_num(secure.clip)}, max_weight={_num(secure.max_weight)}, "
            f"weighted={_flag(config.weighted)})"
        )
    codec = _codec(config.codec)
    if config.dp is not None:
        text = f"dp({_dp_args(config.dp)}{', ' + codec if codec else ''})"
    else:
        text = f"{'mean' if config.weighted else 'unweighted_mean'}{f'({codec})' if codec else ''}"
    if config.clipping is not None:
        text = f"clipping({_stage_args(config.clipping)}, {text})"
    if config.zeroing is not None:
        text = f"zeroing({_stage_args(config.zeroing)}, {text})"
    return text


def _num(value: float) -> str:
    return "inf" if math.isinf(value) else repr(float(value))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _stage_args(stage: NormStageConfig) -> str:
    args = [f"norm_order={_num(stage.norm_order)}"]
    if stage.fixed_norm is not None:
        args.append(f"norm={_num(stage.fixed_norm)}")
    else:
        assert stage.adaptive is not None
        a = stage.adaptive
        args += [
            f"initial_estimate={_num(a.initial_estimate)}",
            f"target_quantile={_num(a.target_quantile)}",
            f"learning_rate={_num(a.learning_rate)}",
            f"multiplier={_num(a.multiplier)}",
            f"increment={_num(a.increment)}",
        ]
    return ", ".join(args)


def _dp_args(dp: DpConfig) -> str:
    args = [
        f"noise_multiplier={_num(dp.noise_multiplier)}",
        f"clients_per_round={_num(dp.clients_per_round)}",
        f"initial_clip={_num(dp.initial_l2_norm_clip)}",
        f"target_quantile={_num(dp.target_unclipped_quantile)}",
        f"learning_rate={_num(dp.learning_rate)}",
        f"target_delta={_num(dp.target_delta)}",
    ]
    if dp.fixed_clip is not None:
        args.append(f"clip={_num(dp.fixed_clip)}")
    if dp.clipped_count_stddev is not None:
        args.append(f"clipped_count_stddev={_num(dp.clipped_count_stddev)}")
    return ", ".join(args)


def _codec(spec: CodecSpec) -> str:
    """ "" for plain float32 (the default inner of mean)."""
    if spec == CodecSpec():
        return ""
    match spec.name:
        case n if n == FLOAT32:
            return "float32"
        case n if n == UNIFORM:
            return (
                f"uniform(bits={spec.bits}, threshold={spec.threshold}, "
                f"rotation={_flag(spec.rotation)})"
            )
        case n if n == SIGN:
            return f"sign(threshold={spec.threshold}, keep_fraction={_num(spec.keep_fraction)})"
        case n if n == TOP_K:
            return f"top_k(threshold={spec.threshold}, fraction={_num(spec.top_k_fraction)})"
    raise ValueError(f"codec {spec.name!r} has no expression")
