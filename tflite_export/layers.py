"""Keras layers rewritten as explicit forward and backward passes in TFLite builtin ops.

TensorFlow's autodiff emits gradient ops (`ReluGrad`, `BiasAddGrad`, `Conv2DBackpropFilter`,
`BroadcastGradientArgs`, ...) that only the Flex delegate can run. We avoid autodiff
altogether: each supported layer becomes a `LayerPlan` whose `forward` and `backward` are
written with ops that convert to builtins (MatMul, Mul, Conv2D, TransposeConv, ArgMax, ...).
The batch size is fixed at export time, so every shape is static and no broadcast-gradient
bookkeeping is needed.

This module holds the dispatcher over a model's chain of layers (`chain`), the element-wise
and shape layers, and the search for the model's final activation; `convolution` and
`spatial_layers` hold convolution, pooling and embedding, `layer_plan` the plan type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tflite_export import convolution, spatial_layers
from tflite_export.chain import layer_chain
from tflite_export.chunking import even_ranges, variable_block_bytes
from tflite_export.errors import ExportError
from tflite_export.layer_plan import Cache, LayerPlan, layer_weight, stateless_plan
from tflite_export.weight_penalties import check_layer_extras, weight_penalty

SUPPORTED_LAYERS = (
    "InputLayer",
    "Dense",
    "Conv2D (valid/same padding, strides, dilation 1, groups 1)",
    "MaxPooling2D and AveragePooling2D (pool size = strides)",
    "GlobalAveragePooling1D/2D",
    "Embedding (first layer)",
    "Flatten",
    "Reshape",
    "Dropout",
    "ReLU",
    "Activation",
    "Softmax (last axis)",
)
SUPPORTED_ACTIVATIONS = ("relu", "tanh", "sigmoid", "softmax", "linear")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """A model's layer plans and where its final activation sits among them.

    `head` indexes the plan of the final activation (softmax, sigmoid, ...): a loss that fuses
    it reads the output of `plans[:head]` (logits) and `plans[head:]` run only in inference.
    It is `len(plans)` when the model ends linear. `unfusable` says why a loss cannot fuse
    the final activation (see `FinalActivation`).
    """

    plans: list[LayerPlan]
    final_activation: str
    head: int
    unfusable: str | None = None


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


def _reshape_plan(
    name: str, batch_size: int, in_shape: Sequence[int], out_shape: Sequence[int]
) -> LayerPlan:
    in_full = [batch_size, *in_shape]
    out_full = [batch_size, *out_shape]
    return stateless_plan(
        name, lambda x: tf.reshape(x, out_full), lambda x, y, dy: tf.reshape(dy, in_full)
    )


def _dense_plan(layer: tf.keras.layers.Dense, in_shape: Sequence[int]) -> list[LayerPlan]:
    if len(in_shape) != 1:
        raise ExportError(
            f"layer {layer.name!r}: Dense on a rank-{len(in_shape) + 1} input is not "
            "supported; supported: Dense on [batch, features]; add a Flatten before it"
        )
    trainable = bool(layer.trainable)
    kernel_value, *rest = layer.get_weights()
    inputs, units = (int(d) for d in kernel_value.shape)
    # A frozen kernel is a constant: nothing is updated, so nothing needs cutting.
    blocks = even_ranges(inputs, 4 * units, variable_block_bytes) if trainable else [(0, inputs)]
    whole = len(blocks) == 1
    params = [
        layer_weight(
            kernel_value[a:b],
            trainable,
            f"{layer.name}/kernel" if whole else f"{layer.name}/kernel/rows_{a}_{b}",
        )
        for a, b in blocks
    ]
    kernel_penalty = weight_penalty(layer, "kernel_regularizer")
    penalties = [kernel_penalty] * len(blocks)
    tensors: list[tuple[str, tuple[int, ...]]] = [(f"{layer.name}/kernel", (inputs, units))]
    if layer.use_bias:
        params.append(layer_weight(rest[0], trainable, f"{layer.name}/bias"))
        penalties.append(weight_penalty(layer, "bias_regularizer"))
        tensors.append((f"{layer.name}/bias", (units,)))
    kernels = len(blocks)

    def rows_of(x: tf.Tensor, a: int, b: int) -> tf.Tensor:
        return x if whole else x[:, a:b]

    # x @ W as a sum over blocks of rows: x[:, a:b] @ W[a:b].
    def forward(x: tf.Tensor, p: Sequence[tf.Tensor], noise: tf.Tensor | None):
        z = None
        for (a, b), block in zip(blocks, p[:kernels], strict=True):
            part = tf.matmul(rows_of(x, a, b), block)
            z = part if z is None else z + part
        return (z + p[kernels] if len(p) > kernels else z), (x,)

    def backward(cache: Cache, dz: tf.Tensor, p: Sequence[tf.Tensor]):
        (x,) = cache
        grads = [tf.matmul(rows_of(x, a, b), dz, transpose_a=True) for a, b in blocks]
        if len(p) > kernels:
            grads.append(tf.reduce_sum(dz, axis=0))
        dx = [tf.matmul(dz, block, transpose_b=True) for block in p[:kernels]]
        return (dx[0] if whole else tf.concat(dx, axis=1)), grads

    return [
        LayerPlan(
            layer.name,
            params,
            forward,
            backward,
            tensors=None if whole and trainable else tensors,
            trainable=trainable,
            penalties=penalties,
        )
    ]


def _dropout_plan(layer: tf.keras.layers.Dropout, in_shape: Sequence[int]) -> LayerPlan:
    """Inverted dropout. The mask comes from uniform noise that the device feeds with each
    train step, drawn from the seed its round's plan carries: every device and every round
    draws its own masks, and a fixed seed reproduces them."""
    if layer.noise_shape is not None:
        raise ExportError(
            f"layer {layer.name!r}: Dropout with a noise_shape is not supported; supported: "
            "Dropout with an independent mask per value (noise_shape=None)"
        )
    rate = float(layer.rate)
    units = int(np.prod(in_shape)) if rate > 0.0 else 0

    def forward(x: tf.Tensor, params: Sequence[tf.Tensor], noise: tf.Tensor | None):
        if noise is None or rate == 0.0:
            return x, (tf.ones_like(x),)
        keep = tf.cast(noise >= rate, tf.float32) / (1.0 - rate)
        return x * keep, (keep,)

    def backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Tensor]):
        (keep,) = cache
        return dy * keep, []

    return LayerPlan(layer.name, [], forward, backward, noise_units=units)


def _passes_values_through(layer: tf.keras.layers.Layer) -> bool:
    """Layers that leave values unchanged at inference: they hide no activation."""
    layers = tf.keras.layers
    if isinstance(layer, layers.Activation):
        return activation_name(layer.activation) == "linear"
    return isinstance(layer, (layers.Flatten, layers.Reshape)) or (type(layer) is layers.Dropout)


def _own_activation(layer: tf.keras.layers.Layer) -> str | None:
    """The activation a layer applies last, or None for a layer that has none (pooling...)."""
    if isinstance(layer, tf.keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, tf.keras.layers.ReLU):
        return "relu"
    activation = getattr(layer, "activation", None)
    return None if activation is None else activation_name(activation)


@dataclasses.dataclass(frozen=True)
class FinalActivation:
    """The activation a model applies last, and where.

    `layer` indexes the chain's layer that applies it (-1 for a linear model). `unfusable`
    says why a loss cannot read logits under it (a later layer changes or regroups its
    outputs); the model then exports only with a loss that reads the output as it is.
    """

    name: str
    layer: int
    unfusable: str | None = None


def find_final_activation(chain: Sequence[tf.keras.layers.Layer]) -> FinalActivation:
    """Looks through the layers that leave values unchanged at inference (Dropout, Flatten,
    Reshape, linear Activation) for the activation the model applies last."""
    output_shape = tuple(chain[-1].output_shape[1:]) if chain else ()
    for index in range(len(chain) - 1, -1, -1):
        layer = chain[index]
        if _passes_values_through(layer):
            continue
        activation = _own_activation(layer)
        if activation is None:
            # A layer without an activation (pooling...): its output is what came before.
            earlier = find_final_activation(chain[:index])
            if earlier.name in ("softmax", "sigmoid"):
                source = chain[earlier.layer].name
                return FinalActivation(
                    earlier.name,
                    earlier.layer,
                    f"layer {layer.name!r} changes the {earlier.name} outputs of layer "
                    f"{source!r}; supported: a {earlier.name} that is the last layer to "
                    "change values (only Dropout, Flatten, Reshape or a linear Activation "
                    "after it)",
                )
            return FinalActivation("linear", -1)
        if activation in ("softmax", "sigmoid"):
            if tuple(layer.output_shape[1:]) != output_shape:
                return FinalActivation(
                    activation,
                    index,
                    f"layer {chain[-1].name!r} regroups the {activation} outputs of layer "
                    f"{layer.name!r} from {tuple(layer.output_shape[1:])} to {output_shape}; "
                    f"supported: layers after the final {activation} that keep its shape",
                )
            dropout = next(
                (
                    later.name
                    for later in chain[index + 1 :]
                    if isinstance(later, tf.keras.layers.Dropout) and float(later.rate) > 0.0
                ),
                None,
            )
            if dropout is not None:
                return FinalActivation(
                    activation,
                    index,
                    f"layer {dropout!r}: Dropout after the final {activation} scales its "
                    "outputs in training; supported: Dropout before the final activation",
                )
        return FinalActivation(activation, index)
    return FinalActivation("linear", -1)


def final_activation(model: tf.keras.Model) -> str:
    """The activation the model applies last: 'softmax', 'sigmoid', ... or 'linear'."""
    return find_final_activation(layer_chain(model)).name


def _check_plain_relu(layer: tf.keras.layers.ReLU) -> None:
    if (
        layer.max_value is not None
        or float(layer.negative_slope) != 0.0
        or float(layer.threshold) != 0.0
    ):
        raise ExportError(
            f"layer {layer.name!r}: ReLU with max_value, negative_slope or threshold is not "
            "supported; supported: plain ReLU (max(x, 0))"
        )


def _layer_plans(
    layer: tf.keras.layers.Layer,
    index: int,
    batch_size: int,
    needs_input_gradient: bool = True,
) -> list[LayerPlan]:
    check_layer_extras(layer)
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
            raise ExportError(
                f"layer {layer.name!r}: Embedding after another layer is not supported; "
                "supported: Embedding as the first layer (its input is the token ids)"
            )
        return [spatial_layers.embedding_plan(layer, batch_size, in_shape)]
    if isinstance(layer, layers.ReLU):
        _check_plain_relu(layer)
        return activation_plan(layer.name, "relu")
    if isinstance(layer, layers.Activation):
        return activation_plan(layer.name, activation_name(layer.activation))
    if isinstance(layer, layers.Softmax):
        if layer.axis not in (-1, len(in_shape)):
            raise ExportError(
                f"layer {layer.name!r}: Softmax over axis {layer.axis} is not supported; "
                "supported: Softmax over the last axis"
            )
        return activation_plan(layer.name, "softmax")
    if isinstance(layer, (layers.Flatten, layers.Reshape)):
        return [_reshape_plan(layer.name, batch_size, in_shape, out_shape)]
    if isinstance(layer, layers.Dropout) and type(layer) is layers.Dropout:
        return [_dropout_plan(layer, in_shape)]
    raise ExportError(
        f"layer {layer.name!r} ({type(layer).__name__}) is not supported by the "
        f"builtin-ops exporter; supported layers: {', '.join(SUPPORTED_LAYERS)}"
    )


def plan_layers(model: tf.keras.Model, batch_size: int) -> ModelPlan:
    """Translates a Sequential model, or a functional one that is a single chain, into layer
    plans, refusing what we cannot train exactly as Keras does.

    The plans include the final activation (e.g. softmax); the loss decides whether to fuse it.
    """
    chain = layer_chain(model)
    final = find_final_activation(chain)
    plans: list[LayerPlan] = []
    head = 0
    for index, layer in enumerate(chain):
        # Below the first trainable layer no gradient flows further back.
        needs_input_gradient = any(plan.params and plan.trainable for plan in plans)
        plans.extend(_layer_plans(layer, index, batch_size, needs_input_gradient))
        if index == final.layer:
            head = len(plans) - 1  # the activation is the layer's last plan
    if final.name == "linear" or final.unfusable:
        head = len(plans)
    if not any(plan.params and plan.trainable for plan in plans):
        raise ExportError(
            "model has no trainable weights; supported: models with at least one trainable "
            "Dense, Conv2D or Embedding layer"
        )
    return ModelPlan(plans, final.name, head, final.unfusable)
