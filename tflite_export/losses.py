"""Losses written out in builtin ops, each with its gradient with respect to the model output.

Keras fuses a final softmax (sigmoid) into categorical (binary) cross-entropy: it computes the
loss from the logits it keeps on the softmax output. We do the same: when the loss and the last
activation pair up, the activation is dropped from the layer plans and the loss reads logits.
The formulas are Keras's: a per-example loss averaged over the real examples of the batch.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tflite_export.errors import ExportError

SUPPORTED_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
)
_ALIASES = {"mse": "mean_squared_error", "bce": "binary_crossentropy"}
# The final activation each loss fuses with (its input is then the logits).
_FUSED_ACTIVATION = {
    "sparse_categorical_crossentropy": "softmax",
    "categorical_crossentropy": "softmax",
    "binary_crossentropy": "sigmoid",
}


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss for a model whose output has `output_shape` (without the batch dimension)."""

    name: str
    output_shape: tuple[int, ...]
    fuses_final_activation: bool

    @property
    def label_shape(self) -> tuple[int, ...]:
        return () if self.name == "sparse_categorical_crossentropy" else self.output_shape

    @property
    def label_dtype(self) -> tf.DType:
        return tf.int32 if self.name == "sparse_categorical_crossentropy" else tf.float32

    @property
    def _units(self) -> float:
        units = 1
        for dim in self.output_shape:
            units *= dim
        return float(units)

    def per_example(self, z: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(loss of each example [B], d loss_b / d z [B, ...]); z is logits when fused."""
        match self.name:
            case "sparse_categorical_crossentropy" | "categorical_crossentropy":
                # log-sum-exp minus the label logit: no SoftmaxCrossEntropyWithLogits (Flex).
                shifted = z - tf.reduce_max(z, axis=-1, keepdims=True)
                exp = tf.exp(shifted)
                sum_exp = tf.reduce_sum(exp, axis=-1, keepdims=True)
                probabilities = exp / sum_exp
                if self.name == "sparse_categorical_crossentropy":
                    target = tf.one_hot(y, int(z.shape[-1]), dtype=tf.float32)
                else:
                    target = y
                label_mass = tf.reduce_sum(target, axis=-1, keepdims=True)
                loss = tf.reduce_sum(target * (tf.math.log(sum_exp) - shifted), axis=-1)
                return loss, probabilities * label_mass - target
            case "binary_crossentropy":
                # max(z, 0) - z*y + log(1 + exp(-|z|)), averaged over the last axis as Keras.
                elementwise = tf.maximum(z, 0.0) - z * y + tf.math.log(1.0 + tf.exp(-tf.abs(z)))
                return (
                    self._mean_per_example(elementwise),
                    (tf.sigmoid(z) - y) / self._units,
                )
            case "mean_squared_error":
                error = z - y
                return self._mean_per_example(error * error), 2.0 * error / self._units
        raise AssertionError(self.name)

    def _mean_per_example(self, elementwise: tf.Tensor) -> tf.Tensor:
        batch = int(elementwise.shape[0])
        return tf.reduce_sum(tf.reshape(elementwise, [batch, -1]), axis=1) / self._units

    def correct(self, z: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Per example: 1.0 when the model's prediction is right (the accuracy metric's view).

        Sparse/categorical: argmax matches the label. Binary: the fraction of outputs on the
        right side of 0.5. Mean squared error over several outputs: argmax matches the
        label's argmax; over one output: 0 (a regression has no accuracy).
        """
        if self.name == "sparse_categorical_crossentropy":
            return tf.cast(tf.equal(tf.argmax(z, axis=-1, output_type=tf.int32), y), tf.float32)
        if self.name == "binary_crossentropy":
            threshold = 0.0 if self.fuses_final_activation else 0.5
            right = tf.cast(tf.equal(z > threshold, y > 0.5), tf.float32)
            return self._mean_per_example(right)
        if self.name == "mean_squared_error" and self.output_shape[-1:] == (1,):
            return tf.zeros([int(z.shape[0])])
        predicted = tf.argmax(z, axis=-1, output_type=tf.int32)
        return tf.cast(tf.equal(predicted, tf.argmax(y, axis=-1, output_type=tf.int32)), tf.float32)


def resolve_loss(name: str, final_activation: str, output_shape: tuple[int, ...]) -> Loss:
    """The loss `name` for a model ending in `final_activation`; refuses a mismatched pair."""
    name = _ALIASES.get(name, name)
    if name not in SUPPORTED_LOSSES:
        raise ExportError(
            f"loss {name!r} is not supported; supported: {', '.join(SUPPORTED_LOSSES)}"
        )
    fused = _FUSED_ACTIVATION.get(name)
    if fused is None:
        return Loss(name, output_shape, fuses_final_activation=False)
    if final_activation not in (fused, "linear"):
        raise ExportError(
            f"loss {name!r} needs the model to end in {fused} (probabilities) or in a linear "
            f"layer (logits); it ends in {final_activation}"
        )
    if len(output_shape) != 1:
        raise ExportError(f"loss {name!r} needs a rank-2 output [batch, units], got {output_shape}")
    return Loss(name, output_shape, fuses_final_activation=final_activation == fused)
