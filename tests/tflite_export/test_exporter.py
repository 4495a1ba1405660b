"""The exporter: builtin ops only, and LiteRT training steps equal TensorFlow's."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from device_runtime.model_file import operator_names, read_manifest
from device_runtime.model_runner import TrainableModel
from tflite_export.errors import ExportError
from tflite_export.exporter import export_model

LEARNING_RATE = 0.1
BATCH = 6


def _flat(model: tf.keras.Model) -> np.ndarray:
    return np.concatenate([w.numpy().ravel() for w in model.trainable_variables])


def _tf_sgd_step(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, from_logits: bool) -> float:
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        variable.assign_sub(LEARNING_RATE * grad)
    return float(loss)


def _mlp(last_activation: str, seed: int = 3) -> tf.keras.Sequential:
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential(
        [
            tf.keras.layers.Reshape((16, 4), input_shape=(8, 8)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(12),
            tf.keras.layers.ReLU(),
            tf.keras.layers.Dense(12, activation="relu"),
            tf.keras.layers.Dense(5, activation=last_activation),
        ]
    )


def _export(model: tf.keras.Model, tmp_path: pathlib.Path) -> TrainableModel:
    path = tmp_path / "model.tflite"
    export_model(model, path, learning_rate=LEARNING_RATE, batch_size=BATCH)
    return TrainableModel(path.read_bytes())


@pytest.mark.parametrize("last_activation", ["softmax", "linear"])
def test_litert_steps_match_tensorflow_gradient_steps(
    tmp_path: pathlib.Path, last_activation: str
) -> None:
    keras_model = _mlp(last_activation)
    runner = _export(keras_model, tmp_path)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(runner.get_weights(), _flat(keras_model))

    for _ in range(3):
        x = rng.random((BATCH, 8, 8), dtype=np.float32)
        y = rng.integers(0, 5, BATCH).astype(np.int32)
        loss, _ = runner.train_step(x, y, np.ones(BATCH, np.float32))
        tf_loss = _tf_sgd_step(keras_model, x, y, from_logits=last_activation == "linear")

        assert abs(loss - tf_loss) <= 1e-5
        assert np.max(np.abs(runner.get_weights() - _flat(keras_model))) <= 1e-5


def test_short_batch_trains_as_tensorflow_on_the_real_examples_alone(
    tmp_path: pathlib.Path,
) -> None:
    keras_model = _mlp("softmax")
    runner = _export(keras_model, tmp_path)
    rng = np.random.default_rng(1)
    x = rng.random((BATCH, 8, 8), dtype=np.float32)
    y = rng.integers(0, 5, BATCH).astype(np.int32)
    real = 4
    x[real:] = 100.0  # padding that would wreck the step if it leaked in
    mask = np.array([1.0] * real + [0.0] * (BATCH - real), np.float32)
    before = runner.get_weights()

    runner.train_step(x, y, mask)
    _tf_sgd_step(keras_model, x[:real], y[:real], from_logits=False)

    assert np.max(np.abs(runner.get_weights() - before)) > 1e-4  # the step did move the weights
    assert np.max(np.abs(runner.get_weights() - _flat(keras_model))) <= 1e-5


def test_model_uses_builtin_ops_only(model_bytes: bytes) -> None:
    ops = operator_names(model_bytes)

    assert ops
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]


def test_evaluate_and_infer_match_keras(tmp_path: pathlib.Path) -> None:
    keras_model = _mlp("softmax")
    runner = _export(keras_model, tmp_path)
    rng = np.random.default_rng(2)
    x = rng.random((15, 8, 8), dtype=np.float32)  # not a multiple of the batch size
    y = rng.integers(0, 5, 15).astype(np.int32)

    probabilities = keras_model(x).numpy()
    result = runner.evaluate(x, y)

    np.testing.assert_allclose(runner.infer(x), probabilities, atol=1e-6)
    assert result.num_examples == 15
    assert result.accuracy == pytest.approx(np.mean(probabilities.argmax(1) == y))
    expected_loss = float(tf.keras.losses.SparseCategoricalCrossentropy()(y, probabilities))
    assert result.loss == pytest.approx(expected_loss, abs=1e-5)


def test_set_weights_then_get_weights_round_trips(model_bytes: bytes) -> None:
    runner = TrainableModel(model_bytes)
    weights = (
        np.random.default_rng(3).normal(size=runner.manifest.num_parameters).astype(np.float32)
    )

    runner.set_weights(weights)

    np.testing.assert_array_equal(runner.get_weights(), weights)


def test_manifest_is_embedded_and_written_beside_the_model(model_path: pathlib.Path) -> None:
    embedded = read_manifest(model_path.read_bytes())
    beside = json.loads(model_path.with_suffix(".tflite.json").read_text())

    assert json.loads(embedded.to_json()) == beside
    assert embedded.batch_size == 8
    assert embedded.input_shape == (8, 8)
    assert [w.offset for w in embedded.weights] == [
        0,
        64 * 16,
        64 * 16 + 16,
        64 * 16 + 16 + 16 * 10,
    ]


def test_unsupported_layer_is_named(tmp_path: pathlib.Path) -> None:
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(8, 8)),
            tf.keras.layers.LayerNormalization(name="my_norm"),
            tf.keras.layers.Dense(10),
        ]
    )

    with pytest.raises(ExportError, match="my_norm.*LayerNormalization.*supported layers"):
        export_model(model, tmp_path / "m.tflite")


def test_unsupported_activation_is_named(tmp_path: pathlib.Path) -> None:
    model = tf.keras.Sequential(
        [tf.keras.layers.Dense(4, activation="selu", input_shape=(3,), name="d")]
    )

    with pytest.raises(ExportError, match="'d'.*selu"):
        export_model(model, tmp_path / "m.tflite")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "hinge"}, "loss 'hinge'"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop'"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_unsupported_training_settings_are_refused(
    tmp_path: pathlib.Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export_model(_mlp("softmax"), tmp_path / "m.tflite", **kwargs)
