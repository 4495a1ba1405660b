"""Server optimizers follow TFF's update rules and defaults exactly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_federated.python.learning.optimizers import adagrad, adam, sgdm, yogi

from server.optimizers import ServerOptimizer, deserialize_state, serialize_state

CASES = {
    "sgd": (lambda: sgdm.build_sgdm(learning_rate=1.0), {"learning_rate": 1.0}),
    "sgdm": (lambda: sgdm.build_sgdm(0.5, momentum=0.9), {"learning_rate": 0.5, "momentum": 0.9}),
    "adam": (lambda: adam.build_adam(0.01), {"learning_rate": 0.01}),
    "yogi": (lambda: yogi.build_yogi(0.01), {"learning_rate": 0.01}),
    "adagrad": (lambda: adagrad.build_adagrad(0.1), {"learning_rate": 0.1}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_tff_over_several_steps(name: str) -> None:
    build_tff, params = CASES[name]
    ours = ServerOptimizer.with_tff_defaults(name, **params)
    theirs = build_tff()
    rng = np.random.default_rng(0)
    weights = rng.normal(size=40).astype(np.float32)
    state, tff_state = ours.initialize(40), theirs.initialize(tf.TensorSpec([40], tf.float32))
    ours_w, tff_w = weights, tf.constant(weights)

    for _ in range(6):
        mean_delta = rng.normal(size=40).astype(np.float32)
        state, ours_w = ours.apply(state, ours_w, mean_delta)
        # TFF's FedAvg hands the optimizer (initial - trained), i.e. minus our delta.
        tff_state, tff_w = theirs.next(tff_state, tff_w, tf.constant(-mean_delta))

    assert np.max(np.abs(ours_w - tff_w.numpy())) <= 1e-6


def test_state_survives_serialization() -> None:
    optimizer = ServerOptimizer.with_tff_defaults("adam", 0.01)
    state, _ = optimizer.apply(
        optimizer.initialize(5), np.ones(5, np.float32), np.ones(5, np.float32)
    )

    restored = deserialize_state(serialize_state(state))

    assert restored.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(restored[key], state[key])


def test_unknown_optimizer_is_named() -> None:
    with pytest.raises(ValueError, match="'rmsprop' is not one of"):
        ServerOptimizer.with_tff_defaults("rmsprop", 0.1)
