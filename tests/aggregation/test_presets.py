"""Aggregator expressions: presets carry TFF's names and defaults; bad ones get clear errors."""

from __future__ import annotations

import math

import pytest

from server.aggregators.presets import parse_aggregator
from server.config import TaskConfig
from server.errors import InvalidArgument


def test_compression_aggregator_has_tffs_defaults() -> None:
    config = parse_aggregator("compression_aggregator()")

    assert (config.codec.name, config.codec.bits, config.codec.threshold) == ("uniform", 8, 20000)
    assert config.weighted
    assert config.zeroing is not None and config.zeroing.adaptive is not None
    zeroing = config.zeroing.adaptive
    assert (zeroing.initial_estimate, zeroing.target_quantile) == (10.0, 0.98)
    assert zeroing.learning_rate == pytest.approx(math.log(10))
    assert (zeroing.multiplier, zeroing.increment, config.zeroing.norm_order) == (2, 1, math.inf)
    assert config.clipping is not None and config.clipping.adaptive is not None
    clipping = config.clipping.adaptive
    assert (clipping.initial_estimate, clipping.target_quantile, clipping.learning_rate) == (
        1.0,
        0.8,
        0.2,
    )


def test_robust_aggregator_switches_stages_off() -> None:
    config = parse_aggregator("robust_aggregator(zeroing=false, weighted=false)")

    assert config.zeroing is None and config.clipping is not None and not config.weighted
    assert config.codec.name == "float32"


def test_dp_aggregator_is_unweighted_zeroed_and_adaptive() -> None:
    config = parse_aggregator("dp_aggregator(noise_multiplier=0.5, clients_per_round=20)")

    assert not config.weighted and config.zeroing is not None
    assert config.dp is not None and config.dp.fixed_clip is None
    assert (config.dp.initial_l2_norm_clip, config.dp.target_unclipped_quantile) == (0.1, 0.5)
    assert config.dp.count_stddev == pytest.approx(1.0)  # 0.05 * clients_per_round


@pytest.mark.parametrize(
    "arguments, stddev",
    [
        ("noise_multiplier=0, clients_per_round=20", 0.0),  # TFF: no noise, no count noise
        ("noise_multiplier=0.5, clients_per_round=20", 1.0),
        ("noise_multiplier=0, clients_per_round=20, clipped_count_stddev=0.3", 0.3),
    ],
)
def test_dp_clipped_count_noise_follows_tffs_rule(arguments: str, stddev: float) -> None:
    config = parse_aggregator(f"dp({arguments})")

    assert config.dp is not None and config.dp.count_stddev == pytest.approx(stddev)


def test_composition_of_stages() -> None:
    config = parse_aggregator(
        "zeroing(norm=5, clipping(norm=2, mean(uniform(bits=4, rotation=true))))"
    )

    assert config.zeroing is not None and config.zeroing.fixed_norm == 5
    assert config.clipping is not None and config.clipping.fixed_norm == 2
    assert (config.codec.bits, config.codec.rotation) == (4, True)


def test_plain_mean_keeps_the_float32_wire_encoding() -> None:
    assert parse_aggregator("mean").plain_mean
    assert not parse_aggregator("mean(uniform)").plain_mean


@pytest.mark.parametrize(
    "expression, message",
    [
        ("median", "unknown aggregator 'median'"),
        ("mean(uniform(bits=40))", "bits must be between 1 and 16"),
        ("zeroing(mean", "missing"),
        ("clipping(zeroing(mean))", "inside zeroing"),
        ("dp_aggregator(clients_per_round=10)", "noise_multiplier is required"),
        ("dp_aggregator(noise_multiplier=1, clients_per_round=10)", "too small"),
        ("mean(uniform(bitz=4))", "unknown argument"),
        ("uniform", "must sit inside"),
        ("zeroing(norm=-1, mean)", "positive"),
        ("clipping(dp(noise_multiplier=0.1, clients_per_round=10))", "do not compose"),
        ("mean(sign(keep_fraction=0))", "keep_fraction"),
        ("mean(uniform(rotation=2))", "true or false"),
    ],
)
def test_bad_expressions_are_refused_with_the_reason(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_aggregator(expression)


def test_task_config_validates_its_aggregator() -> None:
    with pytest.raises(InvalidArgument, match="'aggregator'.*unknown aggregator"):
        TaskConfig(task_id="t", population="p", aggregator="median").validate()


def test_task_config_aggregator_survives_the_admin_wire_and_toml_dict() -> None:
    config = TaskConfig(task_id="t", population="p", aggregator="compression_aggregator()")

    assert TaskConfig.from_proto(config.to_proto()) == config
    assert TaskConfig.from_dict(config.to_dict()) == config


def test_secure_aggregator_is_fixed_clipping_around_a_secure_mean() -> None:
    from server.aggregators.presets import parse_aggregator

    config = parse_aggregator("secure_aggregator(clip=0.2, weighted=false)")

    assert config.secure is not None and config.secure.clip == 0.2
    assert config.secure.max_weight == 1.0  # unweighted: every device weighs the same
    assert not config.plain_mean and config.zeroing is None and config.clipping is None
