"""secure_aggregator's weighted mean through a real session equals the plain weighted mean."""

import numpy as np
import pytest

from device_runtime.secagg.parameters import choose_parameters
from device_runtime.secagg.secure_mean import SecureMeanEncoding
from server.secagg.secure_mean import finalize_secure_mean
from tests.secagg.driver import Dropouts, run_session


def test_the_secure_weighted_mean_matches_the_plain_one_over_survivors() -> None:
    rng = np.random.default_rng(0)
    n, m = 20, 300
    encoding = SecureMeanEncoding(clip=0.5, max_weight=100.0, max_summands=n)
    deltas = {c: rng.normal(0, 0.1, m).astype(np.float32) for c in range(1, n + 1)}
    weights = {c: float(rng.integers(5, 100)) for c in range(1, n + 1)}
    inputs = {c: encoding.encode(deltas[c], weights[c], rng) for c in deltas}

    run = run_session(choose_parameters(n), inputs, 32, Dropouts(after_r1={2, 11}))
    mean, metrics = finalize_secure_mean(run.server, encoding)

    survivors = [c for c in deltas if c not in (2, 11)]
    w = np.array([weights[c] for c in survivors])
    clipped = np.clip(np.array([deltas[c] for c in survivors]), -0.5, 0.5)
    expected = (w[:, None] * clipped).sum(axis=0) / w.sum()
    assert np.max(np.abs(mean - expected)) < 1e-4
    assert metrics["aggregator/total_weight"] == pytest.approx(w.sum(), rel=1e-4)
    assert metrics["aggregator/secure_sum/num_summed"] == len(survivors)


def test_negative_weights_are_refused() -> None:
    encoding = SecureMeanEncoding(clip=1.0, max_weight=10.0, max_summands=4)

    with pytest.raises(ValueError, match="non-negative"):
        encoding.encode(np.zeros(3), -1.0, np.random.default_rng(0))
