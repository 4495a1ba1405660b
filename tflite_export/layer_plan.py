"""The plan of one layer: its weights and its forward and backward passes in builtin ops.

Below `layers`, `convolution` and `spatial_layers`, which each build plans of this type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

Cache = tuple[tf.Tensor, ...]
# forward(x, params, noise) -> (y, cache). `noise` is None in inference; in training, plans
# with `noise_units` get their slice of the step's uniform [0, 1) noise, shaped like x.
Forward = Callable[[tf.Tensor, Sequence[tf.Tensor], tf.Tensor | None], tuple[tf.Tensor, Cache]]
Backward = Callable[[Cache, tf.Tensor, Sequence[tf.Tensor]], tuple[tf.Tensor, list[tf.Tensor]]]


@dataclasses.dataclass(frozen=True)
class WeightPenalty:
    """Keras's L1/L2 weight regularizer: l1 * sum(|w|) + l2 * sum(w^2), added to the loss."""

    l1: float = 0.0
    l2: float = 0.0

    def value(self, w: tf.Tensor) -> tf.Tensor:
        total = tf.constant(0.0)
        if self.l1:
            total += self.l1 * tf.reduce_sum(tf.abs(w))
        if self.l2:
            total += self.l2 * tf.reduce_sum(w * w)
        return total

    def gradient(self, w: tf.Tensor) -> tf.Tensor:
        grad = tf.zeros_like(w)
        if self.l1:
            # d|w|/dw as TensorFlow takes it: sign(w), 0 at 0. Comparisons, not SIGN, which
            # older LiteRT builds lack.
            grad += self.l1 * (tf.cast(w > 0.0, tf.float32) - tf.cast(w < 0.0, tf.float32))
        if self.l2:
            grad += (2.0 * self.l2) * w
        return grad


@dataclasses.dataclass
class LayerPlan:
    """One layer: its weights and its forward/backward in builtin ops.

    `forward(x, params, noise)` returns the output and a cache of what the backward pass
    needs; `backward(cache, dy, params)` returns the gradient with respect to the input and the
    gradients of `params` (same order).

    A frozen layer (`trainable` False: Keras's `layer.trainable = False`) holds its weights as
    constants: they stay in the model, outside the federated weight vector, and its parameter
    gradients are never used (the converter prunes them).

    `tensors` names the layer's weights as Keras has them, (name, shape) in flat-vector order,
    when they are not one variable each: a large kernel is stored as blocks of rows, which lie
    one after another in the flat vector exactly as the whole kernel's rows do.

    `penalties` holds, per parameter, the Keras weight regularizer that adds to the loss.
    `noise_units` is how many uniform noise values per example the layer reads in training.
    """

    name: str
    params: list[tf.Tensor]
    forward: Forward
    backward: Backward
    tensors: list[tuple[str, tuple[int, ...]]] | None = None
    trainable: bool = True
    penalties: list[WeightPenalty | None] = dataclasses.field(default_factory=list)
    noise_units: int = 0

    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.tensors is not None:
            return self.tensors
        return [(v.name.split(":")[0], tuple(int(d) for d in v.shape)) for v in self.params]


def layer_weight(value: np.ndarray, trainable: bool, name: str) -> tf.Tensor:
    """A weight of a plan: a variable when trained, a constant (kept in the model file) when
    the layer is frozen. A frozen plan names its weights in `tensors`: constants have none."""
    if trainable:
        return tf.Variable(value.astype(np.float32), name=name)
    return tf.constant(value.astype(np.float32))


def stateless_plan(
    name: str,
    forward: Callable[[tf.Tensor], tf.Tensor],
    backward: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor],
) -> LayerPlan:
    """A plan without parameters whose backward needs only (x, y, dy)."""

    def plan_forward(x: tf.Tensor, params: Sequence[tf.Tensor], noise: tf.Tensor | None):
        y = forward(x)
        return y, (x, y)

    def plan_backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Tensor]):
        x, y = cache
        return backward(x, y, dy), []

    return LayerPlan(name, [], plan_forward, plan_backward)
