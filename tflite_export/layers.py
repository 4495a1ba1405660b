"""Keras layers rewritten as explicit forward and backward passes in TFLite builtin ops.

TensorFlow's autodiff emits gradient ops (`ReluGrad`, `BiasAddGrad`, `BroadcastGradientArgs`,
...) that only the Flex delegate can run. We avoid autodiff altogether: each supported layer
becomes a `LayerPlan` whose `forward` and `backward` are written with ops that convert to
builtins (MatMul, Mul, Greater, Reshape, Sum). The batch size is fixed at export time, so
every shape is static and no broadcast-gradient bookkeeping is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tflite_export.errors import ExportError

SUPPORTED_LAYERS = (
    "InputLayer",
    "Dense",
    "ReLU",
    "Activation('relu'|'linear')",
    "Flatten",
    "Reshape",
)


@dataclasses.dataclass
class LayerPlan:
    """One layer: its trainable variables and its forward/backward in builtin ops.

    `forward(x, params)` returns the output; `backward(x, y, dy, params)` returns the gradient
    with respect to the input and the gradients of `params` (same order).
    """

    name: str
    params: list[tf.Variable]
    forward: Callable[[tf.Tensor, Sequence[tf.Variable]], tf.Tensor]
    backward: Callable[
        [tf.Tensor, tf.Tensor, tf.Tensor, Sequence[tf.Variable]],
        tuple[tf.Tensor, list[tf.Tensor]],
    ]


def _relu_forward(x: tf.Tensor, params: Sequence[tf.Variable]) -> tf.Tensor:
    return tf.maximum(x, 0.0)


def _relu_backward(
    x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor, params: Sequence[tf.Variable]
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    return dy * tf.cast(x > 0.0, tf.float32), []


def _reshape_plan(name: str, batch_size: int, in_shape: Sequence[int], out_shape: Sequence[int]):
    in_full = [batch_size, *in_shape]
    out_full = [batch_size, *out_shape]

    def forward(x: tf.Tensor, params: Sequence[tf.Variable]) -> tf.Tensor:
        return tf.reshape(x, out_full)

    def backward(x, y, dy, params):
        return tf.reshape(dy, in_full), []

    return LayerPlan(name=name, params=[], forward=forward, backward=backward)


def _dense_plan(layer: tf.keras.layers.Dense) -> list[LayerPlan]:
    kernel_value, *rest = layer.get_weights()
    kernel = tf.Variable(kernel_value.astype(np.float32), name=f"{layer.name}/kernel")
    params = [kernel]
    if layer.use_bias:
        params.append(tf.Variable(rest[0].astype(np.float32), name=f"{layer.name}/bias"))

    def forward(x: tf.Tensor, p: Sequence[tf.Variable]) -> tf.Tensor:
        z = tf.matmul(x, p[0])
        return z + p[1] if len(p) > 1 else z

    def backward(x, y, dz, p):
        grads = [tf.matmul(x, dz, transpose_a=True)]
        if len(p) > 1:
            grads.append(tf.reduce_sum(dz, axis=0))
        return tf.matmul(dz, p[0], transpose_b=True), grads

    plans = [LayerPlan(name=layer.name, params=params, forward=forward, backward=backward)]
    activation = tf.keras.activations.serialize(layer.activation)
    if activation == "relu":
        plans.append(LayerPlan(f"{layer.name}/relu", [], _relu_forward, _relu_backward))
    elif activation not in ("linear", "softmax"):
        raise ExportError(
            f"layer {layer.name!r}: activation {activation!r} is not supported yet; "
            "supported activations: relu, linear, softmax (last layer only)"
        )
    return plans


def final_activation(model: tf.keras.Model) -> str:
    """The activation the model applies last: 'softmax' or 'linear' (logits)."""
    last = model.layers[-1]
    if isinstance(last, tf.keras.layers.Softmax):
        return "softmax"
    activation = getattr(last, "activation", None)
    if activation is None:
        return "linear"
    name = tf.keras.activations.serialize(activation)
    return "softmax" if name == "softmax" else "linear"


def plan_layers(model: tf.keras.Sequential, batch_size: int) -> list[LayerPlan]:
    """Translates a Sequential model into layer plans, refusing what we cannot train."""
    if not isinstance(model, tf.keras.Sequential):
        raise ExportError(
            f"model is a {type(model).__name__}; only tf.keras.Sequential models export for now"
        )
    plans: list[LayerPlan] = []
    for index, layer in enumerate(model.layers):
        is_last = index == len(model.layers) - 1
        in_shape = tuple(layer.input_shape[1:])
        out_shape = tuple(layer.output_shape[1:])
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        if isinstance(layer, tf.keras.layers.Dense):
            if len(in_shape) != 1:
                raise ExportError(
                    f"layer {layer.name!r}: Dense on a rank-{len(in_shape) + 1} input is not "
                    "supported; add a Flatten before it"
                )
            if not is_last and tf.keras.activations.serialize(layer.activation) == "softmax":
                raise ExportError(
                    f"layer {layer.name!r}: softmax is only supported as the last layer"
                )
            plans.extend(_dense_plan(layer))
        elif isinstance(layer, tf.keras.layers.ReLU):
            if (
                layer.max_value is not None
                or float(layer.negative_slope) != 0.0
                or float(layer.threshold) != 0.0
            ):
                raise ExportError(
                    f"layer {layer.name!r}: only plain ReLU (no max_value/slope/threshold)"
                )
            plans.append(LayerPlan(layer.name, [], _relu_forward, _relu_backward))
        elif isinstance(layer, tf.keras.layers.Activation):
            name = tf.keras.activations.serialize(layer.activation)
            if name == "relu":
                plans.append(LayerPlan(layer.name, [], _relu_forward, _relu_backward))
            elif name == "softmax" and is_last:
                continue
            elif name != "linear":
                raise ExportError(
                    f"layer {layer.name!r}: activation {name!r} is not supported yet; "
                    "supported: relu, linear, softmax (last layer only)"
                )
        elif isinstance(layer, tf.keras.layers.Softmax) and is_last:
            continue
        elif isinstance(layer, (tf.keras.layers.Flatten, tf.keras.layers.Reshape)):
            plans.append(_reshape_plan(layer.name, batch_size, in_shape, out_shape))
        else:
            raise ExportError(
                f"layer {layer.name!r} ({type(layer).__name__}) is not supported by the "
                f"builtin-ops exporter; supported layers: {', '.join(SUPPORTED_LAYERS)}"
            )
    if not any(plan.params for plan in plans):
        raise ExportError("model has no trainable layer")
    return plans
