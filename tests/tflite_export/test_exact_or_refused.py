"""The exporter trains exactly the model Keras would, or refuses it naming why.

Frozen layers, weight regularizers, layers after the final softmax and functional chains each
train under LiteRT (TensorFlow blocked) as Keras does, to 1e-5; what cannot be exported so is
refused with a message that names the layer and says what is supported.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from device_runtime.model_file import read_manifest
from device_runtime.model_runner import TrainableModel
from tests.tflite_export.parity import export_and_compare, litert_trajectory, random_steps
from tflite_export.errors import ExportError
from tflite_export.exporter import export_model

L = tf.keras.layers
R = tf.keras.regularizers
BATCH = 6


def _frozen_conv_base() -> tf.keras.Model:
    base = tf.keras.Sequential(
        [
            L.Conv2D(3, 3, activation="relu", input_shape=(6, 6, 2), name="base_conv"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(6, activation="tanh", name="base_dense"),
        ],
        name="base",
    )
    base.trainable = False
    return tf.keras.Sequential([base, L.Dense(4, activation="softmax", name="head")])


def _frozen_middle_layer() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            L.Dense(7, activation="relu", input_shape=(5,), name="below"),
            L.Dense(6, activation="tanh", trainable=False, name="frozen"),
            L.Dense(4, name="above"),
        ]
    )


@pytest.mark.parametrize(
    ("make_model", "x_shape", "frozen", "trainable"),
    [
        (
            _frozen_conv_base,
            (6, 6, 2),
            ["base_conv/kernel", "base_conv/bias", "base_dense/kernel", "base_dense/bias"],
            ["head/kernel", "head/bias"],
        ),
        (
            _frozen_middle_layer,
            (5,),
            ["frozen/kernel", "frozen/bias"],
            ["below/kernel", "below/bias", "above/kernel", "above/bias"],
        ),
    ],
    ids=["frozen_base", "frozen_middle_layer"],
)
def test_frozen_layers_train_as_keras_does_outside_the_federated_vector(
    tmp_path: pathlib.Path,
    make_model: Callable[[], tf.keras.Model],
    x_shape: tuple[int, ...],
    frozen: list[str],
    trainable: list[str],
) -> None:
    steps = random_steps(np.random.default_rng(11), 4, BATCH, x_shape, "sparse", 4)

    deviation = export_and_compare(tmp_path, make_model, steps)

    manifest = read_manifest((tmp_path / "model.tflite").read_bytes())
    model = make_model()
    assert [w.name for w in manifest.weights] == trainable
    assert [w.name for w in manifest.frozen_weights] == frozen
    assert manifest.num_parameters == sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert manifest.num_frozen_parameters == sum(
        int(np.prod(v.shape)) for v in model.non_trainable_weights
    )
    print(f"\nfrozen layers: largest difference from Keras {deviation:.2e}")


def _regularized() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            L.Conv2D(
                3,
                3,
                input_shape=(5, 5, 1),
                kernel_regularizer=R.l1_l2(l1=0.01, l2=0.02),
                bias_regularizer=R.l2(0.5),
            ),
            L.Flatten(),
            L.Dense(6, activation="relu", kernel_regularizer=R.l2(0.5), bias_regularizer=R.l1(0.1)),
            # A frozen layer's regularizer is in Keras's loss too, as a constant.
            L.Dense(5, activation="tanh", kernel_regularizer=R.l2(0.3), trainable=False),
            L.Dense(4, activation="softmax", kernel_regularizer=R.l1(0.05)),
        ]
    )


def _regularized_embedding() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            L.Embedding(11, 4, input_length=5, input_shape=(5,), embeddings_regularizer=R.l2(0.2)),
            L.GlobalAveragePooling1D(),
            L.Dense(4, bias_regularizer=R.l1_l2(0.1, 0.1)),
        ]
    )


@pytest.mark.parametrize(
    ("make_model", "x_shape", "vocabulary"),
    [(_regularized, (5, 5, 1), 0), (_regularized_embedding, (5,), 11)],
    ids=["conv_dense", "embedding"],
)
def test_weight_regularizers_are_in_the_loss_and_its_gradients(
    tmp_path: pathlib.Path,
    make_model: Callable[[], tf.keras.Model],
    x_shape: tuple[int, ...],
    vocabulary: int,
) -> None:
    steps = random_steps(
        np.random.default_rng(12), 4, BATCH, x_shape, "sparse", 4, vocabulary=vocabulary
    )

    deviation = export_and_compare(tmp_path, make_model, steps)

    print(f"\nregularizers: largest difference from Keras {deviation:.2e}")


def test_evaluation_loss_includes_the_regularizers_as_keras_reports_it(
    tmp_path: pathlib.Path,
) -> None:
    tf.keras.utils.set_random_seed(3)
    model = _regularized()
    export_model(model, tmp_path / "m.tflite", batch_size=BATCH)
    steps = random_steps(np.random.default_rng(13), 1, 10, (5, 5, 1), "sparse", 4, short_last=False)
    x, y = steps["x"][0], steps["y"][0]
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy())

    ours = TrainableModel((tmp_path / "m.tflite").read_bytes()).evaluate(x, y)
    keras = model.evaluate(x, y, batch_size=10, verbose=0)

    assert ours.loss == pytest.approx(keras, rel=1e-5)


@pytest.mark.parametrize(
    ("make_model", "loss", "labels", "units"),
    [
        (
            lambda: tf.keras.Sequential(
                [
                    L.Dense(8, activation="relu", input_shape=(5,)),
                    L.Dense(4, activation="softmax"),
                    L.Dropout(0.0),
                    L.Reshape((4,)),
                    L.Flatten(),
                    L.Activation("linear"),
                ]
            ),
            "sparse_categorical_crossentropy",
            "sparse",
            4,
        ),
        (
            lambda: tf.keras.Sequential(
                [
                    L.Dense(8, activation="relu", input_shape=(5,)),
                    L.Dense(3),
                    L.Activation("sigmoid"),
                    L.Dropout(0.0),
                ]
            ),
            "binary_crossentropy",
            "binary",
            3,
        ),
    ],
    ids=["softmax_then_dropout_reshape_flatten_linear", "sigmoid_then_dropout"],
)
def test_the_final_activation_is_found_under_layers_that_keep_values(
    tmp_path: pathlib.Path,
    make_model: Callable[[], tf.keras.Model],
    loss: str,
    labels: str,
    units: int,
) -> None:
    steps = random_steps(np.random.default_rng(14), 4, BATCH, (5,), labels, units)

    deviation = export_and_compare(tmp_path, make_model, steps, loss=loss, from_logits=False)

    manifest = read_manifest((tmp_path / "model.tflite").read_bytes())
    assert manifest.loss == loss
    print(f"\nlayers after the final activation: largest difference from Keras {deviation:.2e}")


def _functional_chain() -> tf.keras.Model:
    inputs = tf.keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(5, activation="tanh", name="hidden")(x)
    outputs = L.Dense(4, activation="softmax", name="out")(x)
    return tf.keras.Model(inputs, outputs)


def test_a_functional_chain_trains_as_keras_does_and_as_its_sequential_twin(
    tmp_path: pathlib.Path,
) -> None:
    steps = random_steps(np.random.default_rng(15), 4, BATCH, (6, 6, 2), "sparse", 4)
    deviation = export_and_compare(tmp_path / "functional", _functional_chain, steps)
    tf.keras.utils.set_random_seed(7)
    functional = _functional_chain()
    twin = tf.keras.Sequential(
        [L.InputLayer((6, 6, 2))]
        + [type(layer).from_config(layer.get_config()) for layer in functional.layers[1:]]
    )
    twin.set_weights(functional.get_weights())
    export_model(functional, tmp_path / "f.tflite", batch_size=BATCH, learning_rate=0.05)
    export_model(twin, tmp_path / "s.tflite", batch_size=BATCH, learning_rate=0.05)

    from_functional = litert_trajectory(tmp_path / "f.tflite", steps)
    from_twin = litert_trajectory(tmp_path / "s.tflite", steps)

    np.testing.assert_array_equal(from_functional.losses, from_twin.losses)
    np.testing.assert_array_equal(from_functional.weights, from_twin.weights)
    print(f"\nfunctional chain: largest difference from Keras {deviation:.2e}")


def _branching() -> tf.keras.Model:
    inputs = tf.keras.Input((4,))
    trunk = L.Dense(5, name="trunk")(inputs)
    left = L.Dense(3, name="left")(trunk)
    right = L.Dense(3, name="right")(trunk)
    return tf.keras.Model(inputs, L.Concatenate(name="join")([left, right]))


def _residual() -> tf.keras.Model:
    inputs = tf.keras.Input((4,))
    x = L.Dense(4, name="d1")(inputs)
    y = L.Dense(4, name="d2")(x)
    return tf.keras.Model(inputs, L.Add(name="sum")([x, y]))


def _dense(**options: object) -> Callable[[], tf.keras.Model]:
    return lambda: tf.keras.Sequential(
        [L.Dense(4, input_shape=(3,), name="d", **options), L.Dense(2)]  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("make_model", "loss", "message"),
    [
        (_branching, "mse", "branches after layer 'trunk' \\(into left, right\\).*single chain"),
        (_residual, "mse", "branches after layer 'd1' \\(into d2, sum\\).*--flex"),
        (
            _dense(activity_regularizer=R.l2(0.1)),
            "mse",
            "'d': activity_regularizer is not supported.*supported: L1, L2",
        ),
        (
            _dense(kernel_constraint=tf.keras.constraints.MaxNorm(1.0)),
            "mse",
            "'d': kernel_constraint MaxNorm is not supported.*supported: layers without",
        ),
        (
            _dense(kernel_regularizer=R.OrthogonalRegularizer()),
            "mse",
            "'d': kernel_regularizer OrthogonalRegularizer.*supported: L1, L2 and L1L2",
        ),
        (
            lambda: tf.keras.Sequential(
                [L.Dense(4, activation="softmax", input_shape=(3,)), L.Dropout(0.5, name="late")]
            ),
            "sparse_categorical_crossentropy",
            "'late': Dropout after the final softmax.*supported: Dropout before",
        ),
        (
            lambda: tf.keras.Sequential(
                [
                    L.Conv2D(2, 3, activation="softmax", input_shape=(6, 6, 1), name="c"),
                    L.AveragePooling2D(2, name="avg"),
                    L.Flatten(),
                ]
            ),
            "categorical_crossentropy",
            "'avg' changes the softmax outputs of layer 'c'.*supported:",
        ),
        (
            lambda: tf.keras.Sequential(
                [L.Dense(6, activation="softmax", input_shape=(3,)), L.Reshape((2, 3), name="r")]
            ),
            "mse",
            None,  # nothing fused, so nothing to refuse: exported as is
        ),
    ],
    ids=[
        "branch",
        "residual_merge",
        "activity_regularizer",
        "constraint",
        "other_regularizer",
        "dropout_after_softmax",
        "pooling_after_softmax",
        "regrouped_softmax_under_mse",
    ],
)
def test_what_cannot_train_exactly_is_refused_naming_the_layer(
    tmp_path: pathlib.Path, make_model: Callable[[], tf.keras.Model], loss: str, message: str | None
) -> None:
    model = make_model()

    if message is None:
        export_model(model, tmp_path / "m.tflite", loss=loss, batch_size=2)
        return
    with pytest.raises(ExportError, match=message):
        export_model(model, tmp_path / "m.tflite", loss=loss, batch_size=2)
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            L.Conv2D(2, 3, dilation_rate=2, name="c"),
            "'c': Conv2D with dilation_rate \\(2, 2\\) is not supported; supported: "
            "dilation_rate \\(1, 1\\)$",
        ),
        (L.ReLU(6.0, name="r"), "'r': ReLU with max_value.*supported: plain ReLU"),
        (L.Softmax(axis=1), "Softmax over axis 1 is not supported; supported: Softmax over the"),
    ],
    ids=["dilation", "relu6", "softmax_axis"],
)
def test_refusals_of_layer_options_say_what_is_supported(
    tmp_path: pathlib.Path, layer: tf.keras.layers.Layer, message: str
) -> None:
    model = tf.keras.Sequential([L.InputLayer((8, 8, 1)), layer, L.Flatten(), L.Dense(3)])

    with pytest.raises(ExportError, match=message):
        export_model(model, tmp_path / "m.tflite")
