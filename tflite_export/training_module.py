"""The `tf.Module` whose signatures become the TFLite training model.

Signatures (the contract the device runtime relies on, recorded in the manifest):
- `train(x, y, mask)` -> `loss`, `correct`: one optimizer step on the masked batch; mean loss
  over the real examples (plus the weight regularizers, as Keras reports it) and how many of
  them the pre-step model classified right. A model with dropout takes `noise` too: uniform
  [0, 1) values, [batch, noise_units], that the device draws from its round's seed.
- `evaluate(x, y, mask)` -> `loss_sum`, `correct`, `count`: sums over real examples; the loss
  sum includes the regularizers once per real example, so loss_sum / count is Keras's loss.
- `infer(x)` -> `output`: the model's output (probabilities when it ends in softmax).
- `get_weights()` -> `weights`: all trainable tensors, flattened and concatenated. Frozen
  layers' weights are constants of the model, outside this vector.
- `set_weights(weights)` -> `num_parameters`: the inverse of `get_weights`. It also records the
  weights as the FedProx anchor: the device sets the round's global weights before training.
- `reset_optimizer()` -> `step`: zeroes the optimizer state (momentum, Adam moments, step).
- `set_proximal_mu(mu)` -> `mu`, only when exported with `fedprox=True`: FedProx's μ; 0 (the
  default) is plain FedAvg. Training then adds μ·(w − anchor) to each gradient, the gradient of
  (μ/2)·‖w − anchor‖²; the reported loss stays the model's loss, as TFF reports it.

FedProx is opt-in because it is not free even at μ = 0: the anchor is a second copy of every
weight, and the term reads it and makes three model-sized passes per step (on the McMahan CNN
~2 ms of ~40 and ~14 MiB of a LiteRT process's resident memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tflite_export.losses import Loss
from tflite_export.networks import Network
from tflite_export.optimizers import ClientOptimizer, OptimizerConfig


class TrainingModule(tf.Module):
    def __init__(
        self,
        network: Network,
        loss: Loss,
        optimizer: OptimizerConfig,
        input_shape: Sequence[int],
        input_dtype: tf.DType,
        batch_size: int,
        fedprox: bool = False,
    ) -> None:
        super().__init__(name="overnight_training")
        self.fedprox = fedprox
        self._network = network
        self._loss = loss
        self._variables = network.variables
        self._optimizer = ClientOptimizer(optimizer, self._variables)
        self._anchor = [
            tf.Variable(v.read_value(), name=f"anchor/{v.name.split(':')[0]}")
            for v in (self._variables if fedprox else [])
        ]
        self._proximal_mu = tf.Variable(0.0, name="proximal_mu") if fedprox else None
        self.num_parameters = sum(int(v.shape.num_elements()) for v in self._variables)

        x_spec = tf.TensorSpec([batch_size, *input_shape], input_dtype, name="x")
        y_spec = tf.TensorSpec([batch_size, *loss.label_shape], loss.label_dtype, name="y")
        mask_spec = tf.TensorSpec([batch_size], tf.float32, name="mask")
        self.noise_units = network.noise_units
        noise_spec = tf.TensorSpec([batch_size, self.noise_units], tf.float32, name="noise")
        w_spec = tf.TensorSpec([self.num_parameters], tf.float32, name="weights")
        mu_spec = tf.TensorSpec([], tf.float32, name="mu")
        if self.noise_units:
            self.train = tf.function(
                self._train,
                autograph=False,
                input_signature=[x_spec, y_spec, mask_spec, noise_spec],
            )
        else:
            self.train = tf.function(
                self._train, autograph=False, input_signature=[x_spec, y_spec, mask_spec]
            )
        self.evaluate = tf.function(
            self._evaluate, autograph=False, input_signature=[x_spec, y_spec, mask_spec]
        )
        self.infer = tf.function(self._infer, autograph=False, input_signature=[x_spec])
        self.get_weights = tf.function(self._get_weights, autograph=False, input_signature=[])
        self.set_weights = tf.function(self._set_weights, autograph=False, input_signature=[w_spec])
        self.reset_optimizer = tf.function(
            self._reset_optimizer, autograph=False, input_signature=[]
        )
        if fedprox:
            self.set_proximal_mu = tf.function(
                self._set_proximal_mu, autograph=False, input_signature=[mu_spec]
            )

    @property
    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return self._network.weight_tensors

    @property
    def frozen_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return self._network.frozen_tensors

    def _train(
        self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor, noise: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        values = [v.read_value() for v in self._variables]
        loss, scores, gradients = self._network.loss_and_gradients(x, y, mask, values, noise)
        if self._proximal_mu is not None:
            mu = self._proximal_mu.read_value()
            gradients = [
                g + mu * (value - anchor)
                for g, value, anchor in zip(gradients, values, self._anchor, strict=True)
            ]
        # Every gradient was computed from the pre-step weights; only now do they change.
        self._optimizer.apply(gradients, values)
        correct = tf.reduce_sum(self._loss.correct(scores, y) * mask)
        return {"loss": loss, "correct": correct}

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        scores = self._network.scores(x)
        per_example, _ = self._loss.per_example(scores, y)
        count = tf.reduce_sum(mask)
        return {
            "loss_sum": tf.reduce_sum(per_example * mask) + self._network.regularization() * count,
            "correct": tf.reduce_sum(self._loss.correct(scores, y) * mask),
            "count": count,
        }

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"output": self._network.predict(x)}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"weights": tf.concat([tf.reshape(v, [-1]) for v in self._variables], axis=0)}

    def _set_weights(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        offset = 0
        for index, variable in enumerate(self._variables):
            size = int(variable.shape.num_elements())
            value = tf.reshape(weights[offset : offset + size], variable.shape)
            variable.assign(value)
            if self._anchor:
                self._anchor[index].assign(value)
            offset += size
        return {"num_parameters": tf.constant(self.num_parameters, tf.int32)}

    def _reset_optimizer(self) -> dict[str, tf.Tensor]:
        self._optimizer.reset()
        return {"step": tf.constant(0, tf.int32)}

    def _set_proximal_mu(self, mu: tf.Tensor) -> dict[str, tf.Tensor]:
        assert self._proximal_mu is not None, "set_proximal_mu exists only with fedprox"
        self._proximal_mu.assign(mu)
        return {"mu": mu}
