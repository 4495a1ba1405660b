"""The two ways a network computes its gradients inside the exported graph.

`PlannedNetwork` chains the layer plans' explicit backward passes: builtin ops only, runs on
stock LiteRT. `KerasNetwork` calls the Keras model under `tf.GradientTape`: any model exports,
but autodiff's gradient ops need the Flex delegate (select TensorFlow ops) on the device.
Both see the batch through the per-example `mask`: the loss is the mean over real examples, so
a zero-padded short batch trains exactly as the real examples alone would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import tensorflow as tf

from tflite_export.errors import ExportError
from tflite_export.layers import LayerPlan
from tflite_export.losses import Loss


class Network(Protocol):
    @property
    def variables(self) -> list[tf.Variable]: ...

    @property
    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """The model's weights as Keras has them, (name, shape) in flat-vector order: what the
        manifest records. The variables may cut a tensor into blocks; they never reorder."""
        ...

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        """What the loss reads, in inference mode: logits when the loss fuses the activation."""
        ...

    def predict(self, x: tf.Tensor) -> tf.Tensor:
        """The model's own output (probabilities when it ends in softmax)."""
        ...

    def loss_and_gradients(
        self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor, values: Sequence[tf.Tensor]
    ) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        """(mean loss over real examples, scores, gradient of each variable), training mode.

        `values` are the variables' values, read once by the caller, in `variables` order.
        """
        ...


def _mean_over_real(per_example: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    count = tf.maximum(tf.reduce_sum(mask), 1.0)
    return tf.reduce_sum(per_example * mask) / count, count


class PlannedNetwork:
    def __init__(self, plans: Sequence[LayerPlan], loss: Loss) -> None:
        plans = list(plans)
        # A fused final activation (softmax/sigmoid) is applied by `predict` only.
        self._head = plans.pop() if loss.fuses_final_activation else None
        self._plans = plans
        self._loss = loss

    @property
    def variables(self) -> list[tf.Variable]:
        return [v for plan in self._plans for v in plan.params]

    @property
    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return [tensor for plan in self._plans for tensor in plan.weight_tensors()]

    def _split(self, values: Sequence[tf.Tensor]) -> list[Sequence[tf.Tensor]]:
        """`values` (one per variable) cut into each plan's parameters."""
        split, start = [], 0
        for plan in self._plans:
            split.append(values[start : start + len(plan.params)])
            start += len(plan.params)
        return split

    def _forward(
        self, x: tf.Tensor, params: Sequence[Sequence[tf.Tensor]], training: bool
    ) -> tuple[tf.Tensor, list]:
        caches = []
        for plan, plan_params in zip(self._plans, params, strict=True):
            x, cache = plan.forward(x, plan_params, training)
            caches.append(cache)
        return x, caches

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        return self._forward(x, [plan.params for plan in self._plans], training=False)[0]

    def predict(self, x: tf.Tensor) -> tf.Tensor:
        z = self.scores(x)
        if self._head is not None:
            z = self._head.forward(z, [], False)[0]
        return z

    def loss_and_gradients(self, x, y, mask, values):
        # Every op reads the values given, not the variables: each variable is read (copied,
        # in LiteRT) once per step instead of once per use.
        params = self._split(values)
        z, caches = self._forward(x, params, training=True)
        per_example, dz = self._loss.per_example(z, y)
        loss, count = _mean_over_real(per_example, mask)
        weight = tf.reshape(mask / count, [-1] + [1] * (len(dz.shape) - 1))
        grad = dz * weight
        grads_by_plan: list[list[tf.Tensor]] = [[] for _ in self._plans]
        for index in range(len(self._plans) - 1, -1, -1):
            plan = self._plans[index]
            grad, grads_by_plan[index] = plan.backward(caches[index], grad, params[index])
        return loss, z, [g for grads in grads_by_plan for g in grads]


class KerasNetwork(tf.Module):
    """The `--flex` network: Keras forward, TensorFlow autodiff.

    A tf.Module, so the saved model tracks every Keras variable (e.g. batch-norm statistics).
    """

    def __init__(self, model: tf.keras.Model, loss: Loss) -> None:
        super().__init__(name="keras_network")
        self._model = model
        self._loss = loss

    @property
    def variables(self) -> list[tf.Variable]:
        return list(self._model.trainable_variables)

    @property
    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(v.name.split(":")[0], tuple(int(d) for d in v.shape)) for v in self.variables]

    def _scores(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        output = self._model(x, training=training)
        if not self._loss.fuses_final_activation:
            return output
        logits = getattr(output, "_keras_logits", None)
        if logits is None:
            raise ExportError(
                f"loss {self._loss.name!r}: cannot find the logits under the model's final "
                "activation; end the model in a linear layer and the loss reads logits"
            )
        return logits

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        return self._scores(x, training=False)

    def predict(self, x: tf.Tensor) -> tf.Tensor:
        return self._model(x, training=False)

    def loss_and_gradients(self, x, y, mask, values):
        # Keras reads its own variables; `values` only serve the optimizer.
        with tf.GradientTape() as tape:
            z = self._scores(x, training=True)
            per_example, _ = self._loss.per_example(z, y)
            loss, _ = _mean_over_real(per_example, mask)
        return loss, z, tape.gradient(loss, self.variables)
