from __future__ import annotations

import numpy as np
import pytest

from device_runtime.model_runner import TrainableModel
from emulator.data import load_digits


def test_training_lowers_the_loss_on_local_examples(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)
    digits = load_digits()
    x, y = digits.x[:200], digits.y[:200]
    before = model.evaluate(x, y)

    result = model.train(x, y, epochs=3, rng=np.random.default_rng(0))

    after = model.evaluate(x, y)
    assert not result.interrupted
    assert result.num_examples == 600
    assert result.num_batches == 3 * 25
    assert after.loss < before.loss


def test_should_stop_interrupts_between_batches(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)
    digits = load_digits()
    polls = iter(range(100))

    result = model.train(
        digits.x[:80],
        digits.y[:80],
        epochs=2,
        rng=np.random.default_rng(0),
        should_stop=lambda: next(polls) >= 3,
    )

    assert result.interrupted
    assert result.num_batches == 3


def test_examples_of_the_wrong_shape_are_refused(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)

    with pytest.raises(ValueError, match=r"shape \(64,\).*\(8, 8\)"):
        model.train(
            np.zeros((4, 64), np.float32), np.zeros(4, np.int32), 1, np.random.default_rng(0)
        )


def test_weights_of_the_wrong_size_are_refused(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)

    with pytest.raises(ValueError, match="float32 of shape"):
        model.set_weights(np.zeros(3, np.float32))


def test_labels_outside_the_classes_are_refused(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)
    before = model.get_weights()

    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
        model.train(
            np.zeros((4, 8, 8), np.float32),
            np.array([0, 1, 10, 2], np.int32),
            1,
            np.random.default_rng(0),
        )
    np.testing.assert_array_equal(model.get_weights(), before)


def test_labels_of_the_wrong_shape_are_refused(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)

    with pytest.raises(ValueError, match=r"labels have shape \(10,\)"):
        model.evaluate(np.zeros((4, 8, 8), np.float32), np.zeros((4, 10), np.int32))


def test_negative_proximal_mu_is_refused(model_bytes: bytes) -> None:
    model = TrainableModel(model_bytes)

    with pytest.raises(ValueError, match="proximal_mu"):
        model.train(
            np.zeros((4, 8, 8), np.float32),
            np.zeros(4, np.int32),
            1,
            np.random.default_rng(0),
            proximal_mu=-1.0,
        )


def test_fedprox_keeps_the_weights_near_the_round_start(model_bytes: bytes) -> None:
    digits = load_digits()
    x, y = digits.x[:160], digits.y[:160]
    drift = {}
    for mu in (0.0, 5.0):
        model = TrainableModel(model_bytes)
        start = model.get_weights()
        model.set_weights(start)  # the round's global weights: FedProx's anchor

        model.train(x, y, epochs=3, rng=np.random.default_rng(0), proximal_mu=mu)

        drift[mu] = float(np.linalg.norm(model.get_weights() - start))
    assert drift[5.0] < 0.5 * drift[0.0]
