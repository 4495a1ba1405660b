"""TensorFlow's reference training and the LiteRT replay of the same steps, side by side.

The reference is Keras: the model's own forward pass, `tf.GradientTape` autodiff of a Keras
loss on the real examples alone (a short batch is cut, not masked), and a Keras optimizer. The
exported model runs in a child process where `import tensorflow` fails.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tflite_export.exporter import export_model

REPO = pathlib.Path(__file__).resolve().parents[2]
LEARNING_RATE = 0.05


@dataclasses.dataclass
class Trajectory:
    losses: np.ndarray  # [steps]
    weights: np.ndarray  # [steps + 1, parameters]: before the first step, then after each


def flat_weights(model: tf.keras.Model) -> np.ndarray:
    return np.concatenate([w.numpy().ravel() for w in model.trainable_variables])


def keras_loss(name: str, from_logits: bool) -> tf.keras.losses.Loss:
    return {
        "sparse_categorical_crossentropy": tf.keras.losses.SparseCategoricalCrossentropy,
        "categorical_crossentropy": tf.keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": tf.keras.losses.BinaryCrossentropy,
    }.get(name, lambda from_logits: tf.keras.losses.MeanSquaredError())(from_logits=from_logits)


def keras_optimizer(
    name: str, learning_rate: float, **options: object
) -> tf.keras.optimizers.Optimizer:
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate, **options)
    return tf.keras.optimizers.SGD(learning_rate, **options)


def tensorflow_trajectory(
    model: tf.keras.Model,
    loss: tf.keras.losses.Loss,
    optimizer: tf.keras.optimizers.Optimizer,
    steps: dict[str, np.ndarray],
    mu: float = 0.0,
) -> Trajectory:
    anchor = [tf.constant(v) for v in model.trainable_variables]
    weights, losses = [flat_weights(model)], []
    for x, y, mask in zip(steps["x"], steps["y"], steps["mask"], strict=True):
        real = mask > 0
        with tf.GradientTape() as tape:
            value = loss(y[real], model(x[real], training=True))
            # The weight regularizers, as Keras's fit adds them (frozen layers' too).
            if model.losses:
                value += tf.add_n(model.losses)
            proximal = sum(
                tf.reduce_sum(tf.square(v - a))
                for v, a in zip(model.trainable_variables, anchor, strict=True)
            )
            objective = value + 0.5 * mu * proximal
        grads = tape.gradient(objective, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(value))
        weights.append(flat_weights(model))
    return Trajectory(np.array(losses), np.stack(weights))


def _tensorflow_blocker(directory: pathlib.Path) -> pathlib.Path:
    package = directory / "tensorflow"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("raise ImportError('no TensorFlow on this device')\n")
    return directory


def litert_trajectory(
    model_path: pathlib.Path, steps: dict[str, np.ndarray], mu: float = 0.0
) -> Trajectory:
    work = model_path.parent
    steps_path, out_path = work / "steps.npz", work / "litert.npz"
    np.savez(steps_path, **steps, **({"mu": np.float32(mu)} if mu else {}))
    blocker = _tensorflow_blocker(work / "blocker")
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{REPO}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.tflite_export.litert_replay",
            model_path,
            steps_path,
            out_path,
        ],
        check=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    out = np.load(out_path)
    return Trajectory(out["loss"], out["weights"])


def random_steps(
    rng: np.random.Generator,
    count: int,
    batch_size: int,
    x_shape: tuple[int, ...],
    labels: str,
    output_units: int,
    vocabulary: int = 0,
    short_last: bool = True,
) -> dict[str, np.ndarray]:
    """`count` batches of random examples; the last holds only a few real examples.

    Inputs are token ids below `vocabulary` when it is set, else normal floats.
    """
    if vocabulary:
        x = rng.integers(0, vocabulary, (count, batch_size, *x_shape)).astype(np.int32)
    else:
        x = rng.normal(size=(count, batch_size, *x_shape)).astype(np.float32)
    mask = np.ones((count, batch_size), np.float32)
    if short_last:
        mask[-1, max(1, batch_size // 3) :] = 0.0
    match labels:
        case "sparse":
            y = rng.integers(0, output_units, (count, batch_size)).astype(np.int32)
        case "one_hot":
            y = np.eye(output_units, dtype=np.float32)[
                rng.integers(0, output_units, (count, batch_size))
            ]
        case "binary":
            y = rng.integers(0, 2, (count, batch_size, output_units)).astype(np.float32)
        case _:
            y = rng.normal(size=(count, batch_size, output_units)).astype(np.float32)
    # Padding rows hold zeros, as the device runtime pads a short batch.
    x = x * mask.reshape(count, batch_size, *[1] * len(x_shape)).astype(x.dtype)
    return {"x": x, "y": y, "mask": mask}


def assert_trajectories_match(
    ours: Trajectory, reference: Trajectory, tolerance: float = 1e-5
) -> None:
    np.testing.assert_allclose(ours.losses, reference.losses, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(ours.weights, reference.weights, rtol=tolerance, atol=tolerance)


def export_and_compare(
    tmp_path: pathlib.Path,
    make_model: Callable[[], tf.keras.Model],
    steps: dict[str, np.ndarray],
    loss: str = "sparse_categorical_crossentropy",
    optimizer: str = "sgd",
    options: dict | None = None,
    mu: float = 0.0,
    learning_rate: float = LEARNING_RATE,
    tolerance: float = 1e-5,
    from_logits: bool | None = None,
) -> float:
    """Exports `make_model()`, trains it under LiteRT and Keras on `steps`, asserts they
    match, and returns the largest difference (losses and weights) for the record.

    `from_logits` tells the Keras loss what the model outputs; by default, logits when the
    last layer's activation is linear."""
    tf.keras.utils.set_random_seed(7)
    reference_model = make_model()
    path = tmp_path / "model.tflite"
    export_model(
        reference_model,
        path,
        loss=loss,
        optimizer=optimizer,
        optimizer_options=options,
        learning_rate=learning_rate,
        batch_size=int(steps["mask"].shape[1]),
        fedprox=bool(mu),
    )
    if from_logits is None:
        last = reference_model.layers[-1].get_config().get("activation", "linear")
        from_logits = last == "linear"
    reference = tensorflow_trajectory(
        reference_model,
        keras_loss(loss, from_logits),
        keras_optimizer("adam" if optimizer == "adam" else "sgd", learning_rate, **(options or {})),
        steps,
        mu=mu,
    )

    ours = litert_trajectory(path, steps, mu=mu)

    assert_trajectories_match(ours, reference, tolerance)
    if optimizer == "sgd" and not mu:
        our_gradients = -np.diff(ours.weights, axis=0) / learning_rate
        tf_gradients = -np.diff(reference.weights, axis=0) / learning_rate
        scale = max(1.0, float(np.abs(tf_gradients).max()))
        np.testing.assert_allclose(our_gradients, tf_gradients, atol=1e-5 * scale)
    return max(
        float(np.abs(ours.losses - reference.losses).max()),
        float(np.abs(ours.weights - reference.weights).max()),
    )
