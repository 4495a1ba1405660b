"""A LiteRT train step of our builtin-ops export equals TensorFlow's autodiff and optimizer.

Every supported layer, loss and optimizer, each over a few steps ending in a short batch: the
losses, the gradients (for SGD, (w_before - w_after) / learning rate) and the updated weights
agree to 1e-5 (relative where values are large). LiteRT runs in a process without TensorFlow.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from device_runtime.model_file import read_manifest
from tests.tflite_export.parity import export_and_compare, random_steps
from tflite_export import convolution, layers
from tflite_export.model_zoo import create_digits_mlp, create_mcmahan_cnn

L = tf.keras.layers
BATCH = 6


def _sequential(*layers: tf.keras.layers.Layer) -> Callable[[], tf.keras.Sequential]:
    return lambda: tf.keras.Sequential(list(layers))


# name -> (model factory, input shape, vocabulary for token inputs)
LAYER_CASES: dict[str, tuple[Callable[[], tf.keras.Sequential], tuple[int, ...], int]] = {
    "dense_tanh_sigmoid_relu": (
        lambda: tf.keras.Sequential(
            [
                L.Dense(7, activation="tanh", input_shape=(5,)),
                L.Dense(6, activation="sigmoid"),
                L.Dense(6),
                L.ReLU(),
                L.Dense(4, use_bias=False),
            ]
        ),
        (5,),
        0,
    ),
    "hidden_softmax_reshape_dropout0": (
        lambda: tf.keras.Sequential(
            [
                L.Reshape((12,), input_shape=(3, 4)),
                L.Dense(6),
                L.Activation("softmax"),
                L.Dropout(0.0),
                L.Dense(4),
            ]
        ),
        (3, 4),
        0,
    ),
    "conv_valid_stride2_avgpool_valid": (
        lambda: tf.keras.Sequential(
            [
                L.Conv2D(4, 3, strides=2, activation="relu", input_shape=(11, 10, 2)),
                L.AveragePooling2D(2),
                L.Flatten(),
                L.Dense(4),
            ]
        ),
        (11, 10, 2),
        0,
    ),
    "conv_same_maxpool_same_odd": (
        lambda: tf.keras.Sequential(
            [
                L.Conv2D(3, 5, padding="same", activation="tanh", input_shape=(7, 7, 1)),
                L.MaxPooling2D(2, padding="same"),
                L.Conv2D(4, (2, 3), strides=(2, 1), padding="same", activation="relu"),
                L.AveragePooling2D(3, padding="same"),
                L.Flatten(),
                L.Dense(4),
            ]
        ),
        (7, 7, 1),
        0,
    ),
    "conv_maxpool_valid_global_average_2d": (
        lambda: tf.keras.Sequential(
            [
                L.Conv2D(5, 3, input_shape=(9, 9, 3)),
                L.MaxPooling2D(2),
                L.GlobalAveragePooling2D(),
                L.Dense(4),
            ]
        ),
        (9, 9, 3),
        0,
    ),
    # Stride-1 convolutions after the first layer: their input-gradient is an im2col matmul
    # with the rotated kernel; SAME with an even kernel pads unevenly.
    "conv_stride1_same_even_kernel_then_valid": (
        lambda: tf.keras.Sequential(
            [
                L.Conv2D(3, 3, input_shape=(9, 8, 2)),
                L.Conv2D(4, (4, 2), padding="same", activation="relu"),
                L.Conv2D(2, (2, 3)),
                L.Flatten(),
                L.Dense(4),
            ]
        ),
        (9, 8, 2),
        0,
    ),
    "embedding_global_average_1d": (
        lambda: tf.keras.Sequential(
            [
                L.Embedding(13, 6, input_length=5, input_shape=(5,)),
                L.GlobalAveragePooling1D(),
                L.Dense(8, activation="relu"),
                L.Dense(4),
            ]
        ),
        (5,),
        13,
    ),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_every_layer_trains_as_tensorflow_does(tmp_path: pathlib.Path, case: str) -> None:
    make_model, x_shape, vocabulary = LAYER_CASES[case]
    steps = random_steps(
        np.random.default_rng(1), 3, BATCH, x_shape, "sparse", 4, vocabulary=vocabulary
    )

    export_and_compare(tmp_path, make_model, steps)


def _head(units: int, activation: str) -> Callable[[], tf.keras.Sequential]:
    return lambda: tf.keras.Sequential(
        [L.Dense(8, activation="relu", input_shape=(5,)), L.Dense(units, activation=activation)]
    )


@pytest.mark.parametrize(
    ("loss", "activation", "labels", "units"),
    [
        ("sparse_categorical_crossentropy", "softmax", "sparse", 4),
        ("sparse_categorical_crossentropy", "linear", "sparse", 4),
        ("categorical_crossentropy", "softmax", "one_hot", 4),
        ("categorical_crossentropy", "linear", "one_hot", 4),
        ("binary_crossentropy", "sigmoid", "binary", 3),
        ("binary_crossentropy", "linear", "binary", 1),
        ("mean_squared_error", "linear", "regression", 2),
        ("mean_squared_error", "sigmoid", "regression", 1),
    ],
)
def test_every_loss_trains_as_tensorflow_does(
    tmp_path: pathlib.Path, loss: str, activation: str, labels: str, units: int
) -> None:
    steps = random_steps(np.random.default_rng(2), 3, BATCH, (5,), labels, units)

    export_and_compare(tmp_path, _head(units, activation), steps, loss=loss)


@pytest.mark.parametrize(
    ("optimizer", "options", "mu"),
    [
        ("sgd", {}, 0.3),
        ("momentum", {"momentum": 0.9}, 0.0),
        ("momentum", {"momentum": 0.8, "nesterov": True}, 0.1),
        ("adam", {}, 0.0),
        ("adam", {"beta_1": 0.5, "epsilon": 1e-3}, 0.2),
    ],
)
def test_every_optimizer_and_fedprox_step_as_tensorflow_does(
    tmp_path: pathlib.Path, optimizer: str, options: dict, mu: float
) -> None:
    steps = random_steps(np.random.default_rng(3), 4, BATCH, (5,), "sparse", 4)

    export_and_compare(
        tmp_path,
        _head(4, "softmax"),
        steps,
        optimizer=optimizer,
        options=options,
        mu=mu,
        learning_rate=0.01,
    )


def test_chunked_convolution_and_blocked_dense_train_as_tensorflow_does(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Budgets small enough that a batch of 5 runs the second convolution's forward and
    # backward in chunks of 2, 2 and 1 examples, and the Dense kernel (64 rows of 5) is stored
    # as blocks of 22, 22 and 20 rows.
    monkeypatch.setattr(convolution, "patch_chunk_bytes", 2 * 4 * 4 * 9 * 4 * 4)
    monkeypatch.setattr(layers, "variable_block_bytes", 30 * 5 * 4)
    make_model = _sequential(
        L.Conv2D(3, 3, input_shape=(6, 6, 2)),
        L.Conv2D(4, 3, padding="same", activation="relu"),
        L.Flatten(),
        L.Dense(5, name="head"),
    )
    steps = random_steps(np.random.default_rng(6), 3, 5, (6, 6, 2), "sparse", 5)

    export_and_compare(tmp_path, make_model, steps)

    manifest = read_manifest((tmp_path / "model.tflite").read_bytes())
    assert [(w.name, w.shape) for w in manifest.weights][-2:] == [
        ("head/kernel", (64, 5)),
        ("head/bias", (5,)),
    ]


def test_tutorial_mlp_matches_over_twenty_steps(tmp_path: pathlib.Path) -> None:
    steps = random_steps(np.random.default_rng(4), 20, 20, (8, 8), "sparse", 10)

    export_and_compare(tmp_path, create_digits_mlp, steps, learning_rate=0.02)


@pytest.mark.e2e
def test_mcmahan_cnn_matches_over_twenty_steps(tmp_path: pathlib.Path) -> None:
    steps = random_steps(np.random.default_rng(5), 20, 20, (28, 28, 1), "sparse", 10)

    export_and_compare(tmp_path, create_mcmahan_cnn, steps, learning_rate=0.02)
