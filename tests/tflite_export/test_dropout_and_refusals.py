"""Dropout under LiteRT, the exporter's refusals, and the `--flex` export."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from device_runtime.manifest import ManifestError
from device_runtime.model_file import read_manifest
from device_runtime.model_runner import TrainableModel
from tflite_export.errors import ExportError
from tflite_export.exporter import export_model

L = tf.keras.layers
RATE = 0.3


def test_dropout_drops_inputs_scales_the_rest_and_is_off_outside_train(
    tmp_path: pathlib.Path,
) -> None:
    # Dropout on the input, one linear unit, batch 1: the kernel's update is non-zero exactly
    # for the kept inputs, which tells us the mask LiteRT drew.
    inputs = 400
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [L.Dropout(RATE, input_shape=(inputs,)), L.Dense(1, use_bias=False)]
    )
    export_model(model, tmp_path / "m.tflite", loss="mse", learning_rate=0.1, batch_size=1)
    runner = TrainableModel((tmp_path / "m.tflite").read_bytes())
    kernel = model.get_weights()[0][:, 0]
    x = np.random.default_rng(0).uniform(0.5, 1.5, (1, inputs)).astype(np.float32)
    y = np.full((1, 1), 5.0, np.float32)

    inferred = runner.infer(x)
    loss, _ = runner.train_step(x, y, np.ones(1, np.float32))
    kept = runner.get_weights() != kernel

    assert 0.6 < kept.mean() < 0.8  # 1 - RATE, give or take sampling
    # A float32 dot of 400 terms: its rounding error scales with the terms, not with the sum,
    # which may land near zero.
    dot_tolerance = 1e-6 * float(np.abs(x[0] * kernel).sum())
    np.testing.assert_allclose(inferred[0, 0], x[0] @ kernel, rtol=1e-5, atol=dot_tolerance)
    output = float(x[0, kept] @ kernel[kept]) / (1 - RATE)
    assert loss == pytest.approx((output - 5.0) ** 2, rel=1e-5)
    expected_kernel = kernel - 0.1 * 2 * (output - 5.0) * x[0] * kept / (1 - RATE)
    np.testing.assert_allclose(runner.get_weights(), expected_kernel, rtol=1e-5, atol=1e-6)
    assert runner.evaluate(x, y).loss == pytest.approx(
        (float(x[0] @ runner.get_weights()) - 5.0) ** 2, rel=1e-5
    )


def test_batch_normalization_is_refused_with_the_reason(tmp_path: pathlib.Path) -> None:
    model = tf.keras.Sequential([L.Dense(4, input_shape=(3,)), L.BatchNormalization(name="bn")])

    with pytest.raises(ExportError, match="'bn'.*BatchNormalization.*refused"):
        export_model(model, tmp_path / "m.tflite", loss="mse")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (L.Conv2D(2, 3, dilation_rate=2, name="c"), "'c'.*dilation"),
        (L.MaxPooling2D(3, strides=2, name="p"), "'p'.*strides"),
        (L.Conv2D(2, 3, activation="elu", name="e"), "'e'.*elu.*supported activations"),
    ],
)
def test_unsupported_layer_options_are_named(
    tmp_path: pathlib.Path, layer: tf.keras.layers.Layer, message: str
) -> None:
    model = tf.keras.Sequential([L.InputLayer((8, 8, 1)), layer, L.Flatten(), L.Dense(3)])

    with pytest.raises(ExportError, match=message):
        export_model(model, tmp_path / "m.tflite")


@pytest.mark.parametrize(
    ("loss", "activation", "message"),
    [
        ("categorical_crossentropy", "sigmoid", "end in softmax"),
        ("binary_crossentropy", "softmax", "end in sigmoid"),
        ("hinge", "linear", "loss 'hinge'.*supported: sparse"),
    ],
)
def test_losses_that_do_not_fit_the_model_are_refused(
    tmp_path: pathlib.Path, loss: str, activation: str, message: str
) -> None:
    model = tf.keras.Sequential([L.Dense(3, activation=activation, input_shape=(4,))])

    with pytest.raises(ExportError, match=message):
        export_model(model, tmp_path / "m.tflite", loss=loss)
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize(
    ("optimizer", "options", "message"),
    [
        ("rmsprop", {}, "optimizer 'rmsprop'.*supported: sgd, momentum, adam"),
        ("sgd", {"momentum": 0.9}, "takes no option"),
        ("momentum", {"momentum": 1.5}, "momentum must be"),
    ],
)
def test_bad_optimizer_settings_are_refused(
    tmp_path: pathlib.Path, optimizer: str, options: dict, message: str
) -> None:
    model = tf.keras.Sequential([L.Dense(3, input_shape=(4,))])

    with pytest.raises(ExportError, match=message):
        export_model(model, tmp_path / "m.tflite", optimizer=optimizer, optimizer_options=options)


def test_flex_export_takes_any_model_and_the_device_refuses_it(tmp_path: pathlib.Path) -> None:
    model = tf.keras.Sequential(
        [
            L.Conv2D(2, 3, activation="relu", input_shape=(5, 5, 1)),
            L.BatchNormalization(),
            L.Flatten(),
            L.Dense(2, activation="softmax"),
        ]
    )

    manifest = export_model(model, tmp_path / "m.tflite", flex=True, batch_size=4)

    assert manifest.flex
    assert any(op.startswith("Flex") for op in manifest.ops)
    model_bytes = (tmp_path / "m.tflite").read_bytes()
    assert read_manifest(model_bytes).flex
    with pytest.raises(ManifestError, match="Flex delegate"):
        TrainableModel(model_bytes)


def test_flex_export_trains_under_tensorflow_lite(tmp_path: pathlib.Path) -> None:
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [L.Conv2D(3, 3, activation="relu", input_shape=(6, 6, 1)), L.Flatten(), L.Dense(2)]
    )
    export_model(model, tmp_path / "m.tflite", flex=True, batch_size=4, learning_rate=0.1)
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "m.tflite"))
    train = interpreter.get_signature_runner("train")
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype(np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(loss_fn(y, model(x)))

    first = float(train(x=x, y=y, mask=np.ones(4, np.float32))["loss"])
    second = float(train(x=x, y=y, mask=np.ones(4, np.float32))["loss"])

    assert first == pytest.approx(expected, rel=1e-5)
    assert second < first
