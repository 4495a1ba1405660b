"""The `tf.Module` whose signatures become the TFLite training model.

Signatures (the contract the device runtime relies on, recorded in the manifest):
- `train(x, y, mask)` -> `loss`, `correct`: one SGD step on the masked batch; mean loss over
  the real examples and how many of them the pre-step model classified right.
- `evaluate(x, y, mask)` -> `loss_sum`, `correct`, `count`: sums over real examples.
- `infer(x)` -> `output`: the model's output (probabilities when it ends in softmax).
- `get_weights()` -> `weights`: all trainable tensors, flattened and concatenated.
- `set_weights(weights)` -> `num_parameters`: the inverse of `get_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tflite_export.layers import LayerPlan


class TrainingModule(tf.Module):
    def __init__(
        self,
        plans: Sequence[LayerPlan],
        input_shape: Sequence[int],
        num_classes: int,
        batch_size: int,
        learning_rate: float,
        output_softmax: bool,
    ) -> None:
        super().__init__(name="overnight_training")
        self._plans = list(plans)
        self._variables = [v for plan in self._plans for v in plan.params]
        self._num_classes = num_classes
        self._batch_size = batch_size
        self._learning_rate = learning_rate
        self._output_softmax = output_softmax
        self.num_parameters = sum(int(v.shape.num_elements()) for v in self._variables)

        x_spec = tf.TensorSpec([batch_size, *input_shape], tf.float32, name="x")
        y_spec = tf.TensorSpec([batch_size], tf.int32, name="y")
        mask_spec = tf.TensorSpec([batch_size], tf.float32, name="mask")
        w_spec = tf.TensorSpec([self.num_parameters], tf.float32, name="weights")
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec, mask_spec])
        self.evaluate = tf.function(self._evaluate, input_signature=[x_spec, y_spec, mask_spec])
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=[w_spec])

    @property
    def weight_variables(self) -> list[tf.Variable]:
        return self._variables

    def _forward(self, x: tf.Tensor) -> list[tf.Tensor]:
        """Returns the activations: the input of each plan, then the logits."""
        activations = [x]
        for plan in self._plans:
            activations.append(plan.forward(activations[-1], plan.params))
        return activations

    def _per_example_loss(self, logits: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Sparse softmax cross-entropy written out (log-sum-exp minus the label logit), so it
        # converts to builtins instead of SparseSoftmaxCrossEntropyWithLogits.
        shifted = logits - tf.reduce_max(logits, axis=1, keepdims=True)
        exp = tf.exp(shifted)
        sum_exp = tf.reduce_sum(exp, axis=1, keepdims=True)
        one_hot = tf.one_hot(y, self._num_classes, dtype=tf.float32)
        loss = tf.math.log(sum_exp[:, 0]) - tf.reduce_sum(shifted * one_hot, axis=1)
        return loss, exp / sum_exp - one_hot

    def _train(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        activations = self._forward(x)
        per_example, dlogits = self._per_example_loss(activations[-1], y)
        count = tf.maximum(tf.reduce_sum(mask), 1.0)
        loss = tf.reduce_sum(per_example * mask) / count
        grad = dlogits * tf.expand_dims(mask, 1) / count
        updates: list[tuple[tf.Variable, tf.Tensor]] = []
        for index in range(len(self._plans) - 1, -1, -1):
            plan = self._plans[index]
            grad, param_grads = plan.backward(
                activations[index], activations[index + 1], grad, plan.params
            )
            updates.extend(zip(plan.params, param_grads, strict=True))
        # Apply after the whole backward pass: every gradient uses the pre-step weights.
        for variable, param_grad in updates:
            variable.assign_sub(self._learning_rate * param_grad)
        return {"loss": loss, "correct": self._correct(activations[-1], y, mask)}

    def _correct(self, logits: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        predicted = tf.argmax(logits, axis=1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, y), tf.float32) * mask)

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self._forward(x)[-1]
        per_example, _ = self._per_example_loss(logits, y)
        return {
            "loss_sum": tf.reduce_sum(per_example * mask),
            "correct": self._correct(logits, y, mask),
            "count": tf.reduce_sum(mask),
        }

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self._forward(x)[-1]
        return {"output": tf.nn.softmax(logits) if self._output_softmax else logits}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"weights": tf.concat([tf.reshape(v, [-1]) for v in self._variables], axis=0)}

    def _set_weights(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        offset = 0
        for variable in self._variables:
            size = int(variable.shape.num_elements())
            variable.assign(tf.reshape(weights[offset : offset + size], variable.shape))
            offset += size
        return {"num_parameters": tf.constant(self.num_parameters, tf.int32)}
