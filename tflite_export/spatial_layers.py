"""Pooling and embedding layers as explicit forward/backward in builtin ops.

The gradients TensorFlow would compute with Flex-only ops are written out (`convolution`
holds Conv2D's):
- max-pool gradient: the upstream gradient routed to the first maximum of each window (ARG_MAX
  then ONE_HOT), exactly as TensorFlow's MaxPoolGrad breaks ties;
- embedding gradient: one-hot(ids)^T @ dy, a MatMul.
Transposes stay at rank 4 or less so every LiteRT kernel accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tflite_export.errors import ExportError
from tflite_export.layer_plan import Cache, LayerPlan, layer_weight
from tflite_export.weight_penalties import weight_penalty

# Stands in for -inf when padding the input of a max-pool: finite, so 0 * pad stays 0.
_LOWEST_FLOAT32 = float(np.finfo(np.float32).min)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow's SAME rule: (output size, padding before, padding after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def check_channels_last(layer: tf.keras.layers.Layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ExportError(f"layer {layer.name!r}: only data_format='channels_last' is supported")


def _to_windows(x: tf.Tensor, oh: int, ow: int, ph: int, pw: int) -> tf.Tensor:
    """[B, oh*ph, ow*pw, C] -> [B*oh*ow, C, ph*pw], windows in row-major order."""
    b, c = int(x.shape[0]), int(x.shape[3])
    rows = tf.reshape(x, [b * oh, ph, ow, pw * c])
    rows = tf.transpose(rows, [0, 2, 1, 3])  # [B*oh, ow, ph, pw*C]
    cells = tf.reshape(rows, [b * oh * ow, ph, pw, c])
    cells = tf.transpose(cells, [0, 3, 1, 2])  # [N, C, ph, pw]
    return tf.reshape(cells, [b * oh * ow, c, ph * pw])


def _from_windows(w: tf.Tensor, b: int, oh: int, ow: int, ph: int, pw: int) -> tf.Tensor:
    """The inverse of `_to_windows`."""
    c = int(w.shape[1])
    cells = tf.reshape(w, [b * oh * ow, c, ph, pw])
    cells = tf.transpose(cells, [0, 2, 3, 1])  # [N, ph, pw, C]
    rows = tf.reshape(cells, [b * oh, ow, ph, pw * c])
    rows = tf.transpose(rows, [0, 2, 1, 3])  # [B*oh, ph, ow, pw*C]
    return tf.reshape(rows, [b, oh * ph, ow * pw, c])


def pooling_plan(
    layer: tf.keras.layers.Layer,
    batch_size: int,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
) -> LayerPlan:
    check_channels_last(layer)
    ph, pw = pair(layer.pool_size)
    if pair(layer.strides) != (ph, pw):
        raise ExportError(
            f"layer {layer.name!r}: pooling with strides {tuple(layer.strides)} != pool size "
            f"{(ph, pw)} (overlapping windows) is not supported; supported: strides = pool size"
        )
    padding = layer.padding.upper()
    height, width, channels = (int(d) for d in in_shape)
    oh, ow = int(out_shape[0]), int(out_shape[1])
    if padding == "SAME":
        _, top, bottom = same_padding(height, ph, ph)
        _, left, right = same_padding(width, pw, pw)
    else:  # VALID drops the rows and columns that fill no window
        top = left = 0
        bottom, right = oh * ph - height, ow * pw - width
    is_max = isinstance(layer, tf.keras.layers.MaxPooling2D)

    def fit_to_windows(x: tf.Tensor, fill: float) -> tf.Tensor:
        """Pads (SAME) or crops (VALID) x to exactly [B, oh*ph, ow*pw, C]."""
        if bottom < 0 or right < 0:
            x = x[:, : height + min(bottom, 0), : width + min(right, 0), :]
        pads = [[0, 0], [top, max(bottom, 0)], [left, max(right, 0)], [0, 0]]
        return tf.pad(x, pads, constant_values=fill) if any(max(*p) for p in pads) else x

    def back_to_input(windows: tf.Tensor) -> tf.Tensor:
        full = _from_windows(windows, batch_size, oh, ow, ph, pw)
        if top or left or bottom > 0 or right > 0:  # an identity slice would still copy
            full = full[:, top : top + height, left : left + width, :]
        if bottom < 0 or right < 0:
            full = tf.pad(full, [[0, 0], [0, max(-bottom, 0)], [0, max(-right, 0)], [0, 0]])
        return full

    # Average pooling with SAME padding divides by the real (unpadded) cells of each window.
    counts = np.zeros((oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            rows = min((i + 1) * ph - top, height) - max(i * ph - top, 0)
            cols = min((j + 1) * pw - left, width) - max(j * pw - left, 0)
            counts[i, j] = rows * cols
    inverse_counts = tf.constant(np.reshape(1.0 / counts, (1, oh * ow, 1, 1)), tf.float32)

    def forward(x: tf.Tensor, params: Sequence[tf.Tensor], noise: tf.Tensor | None):
        pool = tf.nn.max_pool2d if is_max else tf.nn.avg_pool2d
        return pool(x, [ph, pw], [ph, pw], padding), (x,)

    def backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Tensor]):
        (x,) = cache
        dy_cells = tf.reshape(dy, [batch_size * oh * ow, channels, 1])
        if is_max:
            windows = _to_windows(fit_to_windows(x, _LOWEST_FLOAT32), oh, ow, ph, pw)
            first_max = tf.one_hot(tf.argmax(windows, axis=2, output_type=tf.int32), ph * pw)
            return back_to_input(first_max * dy_cells), []
        scaled = tf.reshape(dy, [batch_size, oh * ow, channels, 1]) * inverse_counts
        spread = tf.tile(tf.reshape(scaled, [batch_size * oh * ow, channels, 1]), [1, 1, ph * pw])
        return back_to_input(spread), []

    return LayerPlan(layer.name, [], forward, backward)


def global_average_plan(
    layer: tf.keras.layers.Layer, batch_size: int, in_shape: Sequence[int]
) -> LayerPlan:
    check_channels_last(layer)
    channels = int(in_shape[-1])
    cells = int(np.prod(in_shape[:-1]))
    axes = list(range(1, len(in_shape)))

    def forward(x: tf.Tensor, params: Sequence[tf.Tensor], noise: tf.Tensor | None):
        return tf.reduce_mean(x, axis=axes, keepdims=bool(layer.keepdims)), ()

    def backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Tensor]):
        per_cell = tf.reshape(dy, [batch_size, 1, channels]) / float(cells)
        return tf.reshape(tf.tile(per_cell, [1, cells, 1]), [batch_size, *in_shape]), []

    return LayerPlan(layer.name, [], forward, backward)


def embedding_plan(
    layer: tf.keras.layers.Embedding, batch_size: int, in_shape: Sequence[int]
) -> LayerPlan:
    if layer.mask_zero:
        raise ExportError(
            f"layer {layer.name!r}: Embedding with mask_zero=True is not supported; "
            "supported: mask_zero=False"
        )
    vocabulary, dimension = int(layer.input_dim), int(layer.output_dim)
    (table_value,) = layer.get_weights()
    trainable = bool(layer.trainable)
    table = layer_weight(table_value, trainable, f"{layer.name}/embeddings")
    positions = batch_size * int(np.prod(in_shape))

    def forward(ids: tf.Tensor, p: Sequence[tf.Tensor], noise: tf.Tensor | None):
        return tf.gather(p[0], ids), (ids,)

    def backward(cache: Cache, dy: tf.Tensor, p: Sequence[tf.Tensor]):
        (ids,) = cache
        one_hot = tf.one_hot(tf.reshape(ids, [positions]), vocabulary, dtype=tf.float32)
        d_table = tf.matmul(one_hot, tf.reshape(dy, [positions, dimension]), transpose_a=True)
        # The ids carry no gradient; the training module never uses this first-layer output.
        return tf.zeros([batch_size, *in_shape]), [d_table]

    return LayerPlan(
        layer.name,
        [table],
        forward,
        backward,
        tensors=[(f"{layer.name}/embeddings", (vocabulary, dimension))],
        trainable=trainable,
        penalties=[weight_penalty(layer, "embeddings_regularizer")],
    )
