"""Gaussian differential privacy on the server: noise for the clipped sum, and the privacy spent.

As TFF's `DifferentiallyPrivateFactory`: the sum of clipped updates gets N(0, (z * C)^2) noise
and is divided by the expected number of clients; with an adaptive clip the clipped-count
query spends part of the budget, so the sum's noise multiplier rises to
(z^-2 - (2 * sigma_b)^-2)^-1/2 (Andrew et al. 2021, Theorem 1).

Epsilon is computed with Google's dp-accounting (RDP accountant) for `rounds` Gaussian
mechanisms at multiplier z, without amplification by sampling: the coordinator does not sample
devices uniformly at random (they choose when to check in), so claiming it would be dishonest.
"""

from __future__ import annotations

import math

from server.aggregators.config import DpConfig


def sum_noise_multiplier(dp: DpConfig) -> float:
    if dp.fixed_clip is not None or dp.noise_multiplier == 0:
        return dp.noise_multiplier
    return (dp.noise_multiplier**-2 - (2 * dp.count_stddev) ** -2) ** -0.5


def epsilon_spent(dp: DpConfig, rounds: int) -> float:
    """Epsilon at `dp.target_delta` after `rounds` rounds (inf without noise)."""
    if rounds == 0:
        return 0.0
    if dp.noise_multiplier == 0:
        return math.inf
    import dp_accounting  # server-only dependency; imported lazily to keep start-up fast

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(dp.noise_multiplier), rounds)
    return float(accountant.get_epsilon(dp.target_delta))
