"""Adaptive norm bounds by quantile estimation (Andrew et al. 2021, geometric update)."""

from __future__ import annotations

import math

import numpy as np

from server.aggregators.config import QuantileEstimatorConfig


def bound(config: QuantileEstimatorConfig, estimate: float) -> float:
    return config.multiplier * estimate + config.increment


def next_estimate(
    config: QuantileEstimatorConfig,
    estimate: float,
    below: float,
    count: float,
    noise_stddev: float = 0.0,
    denominator: float | None = None,
    rng: np.random.Generator | None = None,
) -> float:
    """The estimate after a round in which `below` of `count` clients voted norm <= estimate.

    As TFF's QuantileEstimatorQuery: votes are centred at -0.5/+0.5 (sensitivity 0.5), summed,
    noised, divided by `denominator` (the expected count under DP, else the actual count).
    """
    denominator = denominator if denominator is not None else count
    if denominator <= 0:
        return estimate
    centred = below - 0.5 * count
    if noise_stddev > 0:
        assert rng is not None, "noisy quantile estimation needs a random generator"
        centred += float(rng.normal(0.0, noise_stddev))
    fraction = min(1.0, max(0.0, centred / denominator + 0.5))
    return estimate * math.exp(-config.learning_rate * (fraction - config.target_quantile))
