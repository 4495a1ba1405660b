"""The two ways a network computes its gradients inside the exported graph.

`PlannedNetwork` chains the layer plans' explicit backward passes: builtin ops only, runs on
stock LiteRT. `KerasNetwork` calls the Keras model under `tf.GradientTape`: any model exports,
but autodiff's gradient ops need the Flex delegate (select TensorFlow ops) on the device.
Both see the batch through the per-example `mask`: the loss is the mean over real examples, so
a zero-padded short batch trains exactly as the real examples alone would. Both add the
model's weight regularizers to the loss, as Keras's `model.losses` do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import tensorflow as tf

from tflite_export.errors import ExportError
from tflite_export.layers import ModelPlan
from tflite_export.losses import Loss


class Network(Protocol):
    @property
    def variables(self) -> list[tf.Variable]: ...

    @property
    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """The model's weights as Keras has them, (name, shape) in flat-vector order: what the
        manifest records. The variables may cut a tensor into blocks; they never reorder."""
        ...

    @property
    def frozen_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Weights of frozen layers (Keras's `trainable = False`): in the model, outside the
        flat vector and the update."""
        ...

    @property
    def noise_units(self) -> int:
        """Uniform noise values per example a train step reads (for dropout), 0 for none."""
        ...

    def regularization(self) -> tf.Tensor:
        """The weight regularizers' sum at the current weights (0 without regularizers)."""
        ...

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        """What the loss reads, in inference mode: logits when the loss fuses the activation."""
        ...

    def predict(self, x: tf.Tensor) -> tf.Tensor:
        """The model's own output (probabilities when it ends in softmax)."""
        ...

    def loss_and_gradients(
        self,
        x: tf.Tensor,
        y: tf.Tensor,
        mask: tf.Tensor,
        values: Sequence[tf.Tensor],
        noise: tf.Tensor | None,
    ) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        """(mean loss over real examples plus regularizers, scores, gradient of each
        variable), training mode.

        `values` are the variables' values, read once by the caller, in `variables` order.
        `noise` is the step's uniform noise, [batch, noise_units] (None when 0 units).
        """
        ...


def _mean_over_real(per_example: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    count = tf.maximum(tf.reduce_sum(mask), 1.0)
    return tf.reduce_sum(per_example * mask) / count, count


class PlannedNetwork:
    def __init__(self, model_plan: ModelPlan, loss: Loss) -> None:
        plans = list(model_plan.plans)
        # A fused final activation (softmax/sigmoid) and the shape-keeping layers after it
        # run in `predict` only; the loss reads the logits under it.
        cut = model_plan.head if loss.fuses_final_activation else len(plans)
        self._head = plans[cut:]
        self._plans = plans[:cut]
        self._loss = loss
        trainable = [i for i, plan in enumerate(self._plans) if plan.trainable and plan.params]
        # Backward stops at the lowest trainable layer: nothing below it learns.
        self._lowest_trainable = trainable[0] if trainable else len(self._plans)

    @property
    def variables(self) -> list[tf.Variable]:
        return [v for plan in self._plans if plan.trainable for v in plan.params]

    @property
    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return [t for plan in self._plans if plan.trainable for t in plan.weight_tensors()]

    @property
    def frozen_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return [t for plan in self._plans if not plan.trainable for t in plan.weight_tensors()]

    @property
    def noise_units(self) -> int:
        return sum(plan.noise_units for plan in self._plans)

    def _split(self, values: Sequence[tf.Tensor]) -> list[Sequence[tf.Tensor]]:
        """Each plan's parameters: `values` (one per variable) for trainable plans, the
        constants for frozen ones."""
        split, start = [], 0
        for plan in self._plans:
            if plan.trainable:
                split.append(values[start : start + len(plan.params)])
                start += len(plan.params)
            else:
                split.append(plan.params)
        return split

    def _forward(
        self, x: tf.Tensor, params: Sequence[Sequence[tf.Tensor]], noise: tf.Tensor | None
    ) -> tuple[tf.Tensor, list]:
        caches, offset = [], 0
        for plan, plan_params in zip(self._plans, params, strict=True):
            plan_noise = None
            if noise is not None and plan.noise_units:
                plan_noise = tf.reshape(
                    noise[:, offset : offset + plan.noise_units], [int(d) for d in x.shape]
                )
                offset += plan.noise_units
            x, cache = plan.forward(x, plan_params, plan_noise)
            caches.append(cache)
        return x, caches

    def _penalty(self, params: Sequence[Sequence[tf.Tensor]]) -> tf.Tensor:
        total = tf.constant(0.0)
        for plan, plan_params in zip(self._plans, params, strict=True):
            for penalty, value in zip(plan.penalties, plan_params, strict=True):
                if penalty is not None:
                    total += penalty.value(value)
        return total

    def regularization(self) -> tf.Tensor:
        return self._penalty(self._split([v.read_value() for v in self.variables]))

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        return self._forward(x, [plan.params for plan in self._plans], None)[0]

    def predict(self, x: tf.Tensor) -> tf.Tensor:
        z = self.scores(x)
        for plan in self._head:
            z = plan.forward(z, [], None)[0]
        return z

    def loss_and_gradients(self, x, y, mask, values, noise):
        # Every op reads the values given, not the variables: each variable is read (copied,
        # in LiteRT) once per step instead of once per use.
        params = self._split(values)
        z, caches = self._forward(x, params, noise)
        per_example, dz = self._loss.per_example(z, y)
        loss, count = _mean_over_real(per_example, mask)
        loss += self._penalty(params)
        weight = tf.reshape(mask / count, [-1] + [1] * (len(dz.shape) - 1))
        grad = dz * weight
        grads_by_plan: list[list[tf.Tensor]] = [[] for _ in self._plans]
        for index in range(len(self._plans) - 1, self._lowest_trainable - 1, -1):
            plan = self._plans[index]
            grad, grads_by_plan[index] = plan.backward(caches[index], grad, params[index])
            if plan.trainable:
                grads_by_plan[index] = [
                    g if penalty is None else g + penalty.gradient(value)
                    for g, penalty, value in zip(
                        grads_by_plan[index], plan.penalties, params[index], strict=True
                    )
                ]
        return (
            loss,
            z,
            [
                g
                for plan, grads in zip(self._plans, grads_by_plan, strict=True)
                if plan.trainable
                for g in grads
            ],
        )


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

    @property
    def frozen_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return [
            (v.name.split(":")[0], tuple(int(d) for d in v.shape))
            for v in self._model.non_trainable_variables
        ]

    @property
    def noise_units(self) -> int:
        return 0  # Keras's own dropout draws its masks with (Flex) random ops

    def regularization(self) -> tf.Tensor:
        losses = self._model.losses
        return tf.add_n(losses) if losses else tf.constant(0.0)

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

    def loss_and_gradients(self, x, y, mask, values, noise):
        # Keras reads its own variables; `values` only serve the optimizer.
        with tf.GradientTape() as tape:
            z = self._scores(x, training=True)
            per_example, _ = self._loss.per_example(z, y)
            loss, _ = _mean_over_real(per_example, mask)
            loss += self.regularization()
        return loss, z, tape.gradient(loss, self.variables)
