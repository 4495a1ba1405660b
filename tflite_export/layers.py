"""Keras layers rewritten as explicit forward and backward passes in TFLite builtin ops.

TensorFlow's autodiff emits gradient ops (`ReluGrad`, `BiasAddGrad`, `Conv2DBackpropFilter`,
`BroadcastGradientArgs`, ...) that only the Flex delegate can run. We avoid autodiff
altogether: each supported layer becomes a `LayerPlan` whose `forward` and `backward` are
written with ops that convert to builtins (MatMul, Mul, Conv2D, TransposeConv, ArgMax, ...).
The batch size is fixed at export time, so every shape is static and no broadcast-gradient
bookkeeping is needed.

This module holds the plan type, the dispatcher over a Sequential model, and the element-wise
and shape layers; `spatial_layers` holds convolution, pooling and embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tflite_export import convolution, spatial_layers
from tflite_export.chunking import even_ranges, variable_block_bytes
from tflite_export.errors import ExportError

Cache = tuple[tf.Tensor, ...]
Forward = Callable[[tf.Tensor, Sequence[tf.Variable], bool], tuple[tf.Tensor, Cache]]
Backward = Callable[[Cache, tf.Tensor, Sequence[tf.Variable]], tuple[tf.Tensor, list[tf.Tensor]]]

SUPPORTED_LAYERS = (
    "InputLayer",
    "Dense",
    "Conv2D (valid/same padding, strides, dilation 1)",
    "MaxPooling2D and AveragePooling2D (pool size = strides)",
    "GlobalAveragePooling1D/2D",
    "Embedding (first layer)",
    "Flatten",
    "Reshape",
    "Dropout",
    "ReLU",
    "Activation",
    "Softmax (last layer)",
)
SUPPORTED_ACTIVATIONS = ("relu", "tanh", "sigmoid", "softmax", "linear")


@dataclasses.dataclass
class LayerPlan:
    """One layer: its trainable variables and its forward/backward in builtin ops.

    `forward(x, params, training)` returns the output and a cache of what the backward pass
    needs; `backward(cache, dy, params)` returns the gradient with respect to the input and the
    gradients of `params` (same order).

    `tensors` names the layer's weights as Keras has them, (name, shape) in flat-vector order,
    when they are not one variable each: a large kernel is stored as blocks of rows, which lie
    one after another in the flat vector exactly as the whole kernel's rows do.
    """

    name: str
    params: list[tf.Variable]
    forward: Forward
    backward: Backward
    tensors: list[tuple[str, tuple[int, ...]]] | None = None

    def weight_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.tensors is not None:
            return self.tensors
        return [(v.name.split(":")[0], tuple(int(d) for d in v.shape)) for v in self.params]


def stateless_plan(
    name: str,
    forward: Callable[[tf.Tensor], tf.Tensor],
    backward: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor],
) -> LayerPlan:
    """A plan without parameters whose backward needs only (x, y, dy)."""

    def plan_forward(x: tf.Tensor, params: Sequence[tf.Variable], training: bool):
        y = forward(x)
        return y, (x, y)

    def plan_backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Variable]):
        x, y = cache
        return backward(x, y, dy), []

    return LayerPlan(name, [], plan_forward, plan_backward)


def _softmax_backward(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return y * (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True))


# Each activation: forward, and backward from (x, y, dy), written with builtin ops only.
_ACTIVATIONS: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], Callable[..., tf.Tensor]]] = {
    "relu": (lambda x: tf.maximum(x, 0.0), lambda x, y, dy: dy * tf.cast(x > 0.0, tf.float32)),
    "tanh": (tf.tanh, lambda x, y, dy: dy * (1.0 - y * y)),
    "sigmoid": (tf.sigmoid, lambda x, y, dy: dy * y * (1.0 - y)),
    "softmax": (tf.nn.softmax, _softmax_backward),
}


def activation_name(activation: object) -> str:
    return str(tf.keras.activations.serialize(activation))


def activation_plan(layer_name: str, name: str) -> list[LayerPlan]:
    """The plan of one activation ([] for linear); refuses an unsupported one, naming it."""
    if name == "linear":
        return []
    if name not in _ACTIVATIONS:
        raise ExportError(
            f"layer {layer_name!r}: activation {name!r} is not supported; "
            f"supported activations: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    forward, backward = _ACTIVATIONS[name]
    return [stateless_plan(f"{layer_name}/{name}", forward, backward)]


def _reshape_plan(name: str, batch_size: int, in_shape: Sequence[int], out_shape: Sequence[int]):
    in_full = [batch_size, *in_shape]
    out_full = [batch_size, *out_shape]
    return stateless_plan(
        name, lambda x: tf.reshape(x, out_full), lambda x, y, dy: tf.reshape(dy, in_full)
    )


def _dense_plan(layer: tf.keras.layers.Dense, in_shape: Sequence[int]) -> list[LayerPlan]:
    if len(in_shape) != 1:
        raise ExportError(
            f"layer {layer.name!r}: Dense on a rank-{len(in_shape) + 1} input is not "
            "supported; add a Flatten before it"
        )
    kernel_value, *rest = layer.get_weights()
    inputs, units = (int(d) for d in kernel_value.shape)
    blocks = even_ranges(inputs, 4 * units, variable_block_bytes)
    whole = len(blocks) == 1
    params = [
        tf.Variable(
            kernel_value[a:b].astype(np.float32),
            name=f"{layer.name}/kernel" if whole else f"{layer.name}/kernel/rows_{a}_{b}",
        )
        for a, b in blocks
    ]
    tensors: list[tuple[str, tuple[int, ...]]] = [(f"{layer.name}/kernel", (inputs, units))]
    if layer.use_bias:
        params.append(tf.Variable(rest[0].astype(np.float32), name=f"{layer.name}/bias"))
        tensors.append((f"{layer.name}/bias", (units,)))
    kernels = len(blocks)

    def rows_of(x: tf.Tensor, a: int, b: int) -> tf.Tensor:
        return x if whole else x[:, a:b]

    # x @ W as a sum over blocks of rows: x[:, a:b] @ W[a:b].
    def forward(x: tf.Tensor, p: Sequence[tf.Variable], training: bool):
        z = None
        for (a, b), block in zip(blocks, p[:kernels], strict=True):
            part = tf.matmul(rows_of(x, a, b), block)
            z = part if z is None else z + part
        return (z + p[kernels] if len(p) > kernels else z), (x,)

    def backward(cache: Cache, dz: tf.Tensor, p: Sequence[tf.Variable]):
        (x,) = cache
        grads = [tf.matmul(rows_of(x, a, b), dz, transpose_a=True) for a, b in blocks]
        if len(p) > kernels:
            grads.append(tf.reduce_sum(dz, axis=0))
        dx = [tf.matmul(dz, block, transpose_b=True) for block in p[:kernels]]
        return (dx[0] if whole else tf.concat(dx, axis=1)), grads

    return [LayerPlan(layer.name, params, forward, backward, None if whole else tensors)]


def _dropout_plan(
    layer: tf.keras.layers.Dropout, batch_size: int, in_shape: Sequence[int], seed: int
) -> LayerPlan:
    """Inverted dropout; the mask comes from the builtin RANDOM_UNIFORM op, seeded per layer."""
    if layer.noise_shape is not None:
        raise ExportError(f"layer {layer.name!r}: Dropout with a noise_shape is not supported")
    rate = float(layer.rate)
    shape = [batch_size, *in_shape]

    def forward(x: tf.Tensor, params: Sequence[tf.Variable], training: bool):
        if not training or rate == 0.0:
            return x, (tf.ones_like(x),)
        keep = tf.cast(tf.random.uniform(shape, seed=seed) >= rate, tf.float32) / (1.0 - rate)
        return x * keep, (keep,)

    def backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Variable]):
        (keep,) = cache
        return dy * keep, []

    return LayerPlan(layer.name, [], forward, backward)


def final_activation(model: tf.keras.Model) -> str:
    """The activation the model applies last: 'softmax', 'sigmoid', ... or 'linear'."""
    last = model.layers[-1]
    if isinstance(last, tf.keras.layers.Softmax):
        return "softmax"
    if isinstance(last, tf.keras.layers.ReLU):
        return "relu"
    activation = getattr(last, "activation", None)
    return "linear" if activation is None else activation_name(activation)


def _check_plain_relu(layer: tf.keras.layers.ReLU) -> None:
    if (
        layer.max_value is not None
        or float(layer.negative_slope) != 0.0
        or float(layer.threshold) != 0.0
    ):
        raise ExportError(f"layer {layer.name!r}: only plain ReLU (no max_value/slope/threshold)")


def _layer_plans(
    layer: tf.keras.layers.Layer,
    index: int,
    batch_size: int,
    seed: int,
    needs_input_gradient: bool = True,
) -> list[LayerPlan]:
    in_shape = tuple(int(d) for d in layer.input_shape[1:])
    out_shape = tuple(int(d) for d in layer.output_shape[1:])
    layers = tf.keras.layers
    if isinstance(layer, layers.BatchNormalization):
        raise ExportError(
            f"layer {layer.name!r} (BatchNormalization) is refused: its moving statistics "
            "would need per-client state outside the federated weights, and its training-time "
            "batch statistics break the masked fixed-size batch; remove it, or export with "
            "--flex for devices that ship TensorFlow. "
            f"Supported layers: {', '.join(SUPPORTED_LAYERS)}"
        )
    if isinstance(layer, layers.Dense):
        return _dense_plan(layer, in_shape) + activation_plan(
            layer.name, activation_name(layer.activation)
        )
    if isinstance(layer, layers.Conv2D) and type(layer) is layers.Conv2D:
        return convolution.conv2d_plan(
            layer, batch_size, in_shape, needs_input_gradient
        ) + activation_plan(layer.name, activation_name(layer.activation))
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return [spatial_layers.pooling_plan(layer, batch_size, in_shape, out_shape)]
    if isinstance(layer, (layers.GlobalAveragePooling1D, layers.GlobalAveragePooling2D)):
        return [spatial_layers.global_average_plan(layer, batch_size, in_shape)]
    if isinstance(layer, layers.Embedding):
        if index != 0:
            raise ExportError(f"layer {layer.name!r}: Embedding is supported as the first layer")
        return [spatial_layers.embedding_plan(layer, batch_size, in_shape)]
    if isinstance(layer, layers.ReLU):
        _check_plain_relu(layer)
        return activation_plan(layer.name, "relu")
    if isinstance(layer, layers.Activation):
        return activation_plan(layer.name, activation_name(layer.activation))
    if isinstance(layer, layers.Softmax):
        if layer.axis not in (-1, len(in_shape)):
            raise ExportError(f"layer {layer.name!r}: Softmax over axis {layer.axis}")
        return activation_plan(layer.name, "softmax")
    if isinstance(layer, (layers.Flatten, layers.Reshape)):
        return [_reshape_plan(layer.name, batch_size, in_shape, out_shape)]
    if isinstance(layer, layers.Dropout) and type(layer) is layers.Dropout:
        return [_dropout_plan(layer, batch_size, in_shape, seed + index)]
    raise ExportError(
        f"layer {layer.name!r} ({type(layer).__name__}) is not supported by the "
        f"builtin-ops exporter; supported layers: {', '.join(SUPPORTED_LAYERS)}"
    )


def plan_layers(model: tf.keras.Model, batch_size: int, seed: int = 0) -> list[LayerPlan]:
    """Translates a Sequential model into layer plans, refusing what we cannot train.

    The plans include the final activation (e.g. softmax); the loss decides whether to fuse it.
    """
    if not isinstance(model, tf.keras.Sequential):
        raise ExportError(
            f"model is a {type(model).__name__}; only tf.keras.Sequential models export "
            "with builtin ops (use --flex for other models)"
        )
    plans: list[LayerPlan] = []
    trainable_layers = [la for la in model.layers if not isinstance(la, tf.keras.layers.InputLayer)]
    for index, layer in enumerate(trainable_layers):
        # Below the first trainable layer no gradient flows further back.
        needs_input_gradient = any(plan.params for plan in plans)
        plans.extend(_layer_plans(layer, index, batch_size, seed, needs_input_gradient))
    if not any(plan.params for plan in plans):
        raise ExportError("model has no trainable layer")
    return plans
