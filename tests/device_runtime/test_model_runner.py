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
