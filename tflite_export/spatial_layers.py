"""Convolution, pooling and embedding layers as explicit forward/backward in builtin ops.

The gradients TensorFlow would compute with Flex-only ops are written out:
- conv input-gradient: a transposed convolution (TRANSPOSE_CONV) with the same padding;
- conv filter-gradient: a convolution of the transposed (padded) input with the transposed
  output-gradient, zeros inserted between its rows and columns when the stride is above 1;
- max-pool gradient: the upstream gradient routed to the first maximum of each window (ARG_MAX
  then ONE_HOT), exactly as TensorFlow's MaxPoolGrad breaks ties;
- embedding gradient: one-hot(ids)^T @ dy, a MatMul.
Transposes stay at rank 4 or less so every LiteRT kernel accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from tflite_export.errors import ExportError

if TYPE_CHECKING:
    from tflite_export.layers import Cache, LayerPlan

# Stands in for -inf when padding the input of a max-pool: finite, so 0 * pad stays 0.
_LOWEST_FLOAT32 = float(np.finfo(np.float32).min)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow's SAME rule: (output size, padding before, padding after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _valid_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _check_channels_last(layer: tf.keras.layers.Layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ExportError(f"layer {layer.name!r}: only data_format='channels_last' is supported")


def _insert_zeros(dz: tf.Tensor, sh: int, sw: int) -> tf.Tensor:
    """[B, oh, ow, C] -> [B, (oh-1)*sh+1, (ow-1)*sw+1, C] with zeros between the entries."""
    if sh == 1 and sw == 1:
        return dz
    b, oh, ow, c = (int(d) for d in dz.shape)
    spread = tf.reshape(dz, [b * oh, 1, ow, c])
    spread = tf.pad(spread, [[0, 0], [0, sh - 1], [0, 0], [0, 0]])
    spread = tf.reshape(spread, [b, oh * sh, ow, 1, c])
    spread = tf.reshape(spread, [b * oh * sh, ow, 1, c])
    spread = tf.pad(spread, [[0, 0], [0, 0], [0, sw - 1], [0, 0]])
    spread = tf.reshape(spread, [b, oh * sh, ow * sw, c])
    return spread[:, : (oh - 1) * sh + 1, : (ow - 1) * sw + 1, :]


def conv2d_plan(
    layer: tf.keras.layers.Conv2D, batch_size: int, in_shape: Sequence[int]
) -> list[LayerPlan]:
    from tflite_export.layers import LayerPlan

    _check_channels_last(layer)
    if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise ExportError(
            f"layer {layer.name!r}: Conv2D with dilation {tuple(layer.dilation_rate)} or "
            f"groups {layer.groups} is not supported; supported: dilation 1, groups 1"
        )
    padding = layer.padding.upper()
    if padding not in ("VALID", "SAME"):
        raise ExportError(f"layer {layer.name!r}: padding {layer.padding!r} is not supported")
    height, width, channels = (int(d) for d in in_shape)
    kh, kw = _pair(layer.kernel_size)
    sh, sw = _pair(layer.strides)
    if padding == "SAME":
        _, top, bottom = _same_padding(height, kh, sh)
        _, left, right = _same_padding(width, kw, sw)
    else:
        top = bottom = left = right = 0
    kernel_value, *rest = layer.get_weights()
    params = [tf.Variable(kernel_value.astype(np.float32), name=f"{layer.name}/kernel")]
    if layer.use_bias:
        params.append(tf.Variable(rest[0].astype(np.float32), name=f"{layer.name}/bias"))
    x_shape = [batch_size, height, width, channels]

    def forward(x: tf.Tensor, p: Sequence[tf.Variable], training: bool):
        z = tf.nn.conv2d(x, p[0], strides=[1, sh, sw, 1], padding=padding)
        return (z + p[1] if len(p) > 1 else z), (x,)

    def backward(cache: Cache, dz: tf.Tensor, p: Sequence[tf.Variable]):
        (x,) = cache
        dx = tf.nn.conv2d_transpose(dz, p[0], x_shape, strides=[1, sh, sw, 1], padding=padding)
        padded = x
        if top or bottom or left or right:
            padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        # dK[i, j, c, o] = sum_{b, u, v} x_p[b, u*sh + i, v*sw + j, c] * dz[b, u, v, o]:
        # a convolution with batch and channels of x swapped, dz as the filter.
        x_t = tf.transpose(padded, [3, 1, 2, 0])
        dz_t = tf.transpose(_insert_zeros(dz, sh, sw), [1, 2, 0, 3])
        dk = tf.nn.conv2d(x_t, dz_t, strides=1, padding="VALID")[:, :kh, :kw, :]
        grads = [tf.transpose(dk, [1, 2, 0, 3])]
        if len(p) > 1:
            grads.append(tf.reduce_sum(dz, axis=[0, 1, 2]))
        return dx, grads

    return [LayerPlan(layer.name, params, forward, backward)]


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
    from tflite_export.layers import LayerPlan

    _check_channels_last(layer)
    ph, pw = _pair(layer.pool_size)
    if _pair(layer.strides) != (ph, pw):
        raise ExportError(
            f"layer {layer.name!r}: pooling with strides {tuple(layer.strides)} != pool size "
            f"{(ph, pw)} (overlapping windows) is not supported; supported: strides = pool size"
        )
    padding = layer.padding.upper()
    height, width, channels = (int(d) for d in in_shape)
    oh, ow = int(out_shape[0]), int(out_shape[1])
    if padding == "SAME":
        _, top, bottom = _same_padding(height, ph, ph)
        _, left, right = _same_padding(width, pw, pw)
    else:  # VALID drops the rows and columns that fill no window
        top = left = 0
        bottom, right = oh * ph - height, ow * pw - width
    is_max = isinstance(layer, tf.keras.layers.MaxPooling2D)

    def fit_to_windows(x: tf.Tensor, fill: float) -> tf.Tensor:
        """Pads (SAME) or crops (VALID) x to exactly [B, oh*ph, ow*pw, C]."""
        x = x[:, : height + min(bottom, 0), : width + min(right, 0), :]
        pads = [[0, 0], [top, max(bottom, 0)], [left, max(right, 0)], [0, 0]]
        return tf.pad(x, pads, constant_values=fill) if any(max(*p) for p in pads) else x

    def back_to_input(windows: tf.Tensor) -> tf.Tensor:
        full = _from_windows(windows, batch_size, oh, ow, ph, pw)
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

    def forward(x: tf.Tensor, params: Sequence[tf.Variable], training: bool):
        pool = tf.nn.max_pool2d if is_max else tf.nn.avg_pool2d
        return pool(x, [ph, pw], [ph, pw], padding), (x,)

    def backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Variable]):
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
    from tflite_export.layers import LayerPlan

    _check_channels_last(layer)
    channels = int(in_shape[-1])
    cells = int(np.prod(in_shape[:-1]))
    axes = list(range(1, len(in_shape)))

    def forward(x: tf.Tensor, params: Sequence[tf.Variable], training: bool):
        return tf.reduce_mean(x, axis=axes, keepdims=bool(layer.keepdims)), ()

    def backward(cache: Cache, dy: tf.Tensor, params: Sequence[tf.Variable]):
        per_cell = tf.reshape(dy, [batch_size, 1, channels]) / float(cells)
        return tf.reshape(tf.tile(per_cell, [1, cells, 1]), [batch_size, *in_shape]), []

    return LayerPlan(layer.name, [], forward, backward)


def embedding_plan(
    layer: tf.keras.layers.Embedding, batch_size: int, in_shape: Sequence[int]
) -> LayerPlan:
    from tflite_export.layers import LayerPlan

    if layer.mask_zero:
        raise ExportError(f"layer {layer.name!r}: Embedding with mask_zero=True is not supported")
    vocabulary, dimension = int(layer.input_dim), int(layer.output_dim)
    (table_value,) = layer.get_weights()
    table = tf.Variable(table_value.astype(np.float32), name=f"{layer.name}/embeddings")
    positions = batch_size * int(np.prod(in_shape))

    def forward(ids: tf.Tensor, p: Sequence[tf.Variable], training: bool):
        return tf.gather(p[0], ids), (ids,)

    def backward(cache: Cache, dy: tf.Tensor, p: Sequence[tf.Variable]):
        (ids,) = cache
        one_hot = tf.one_hot(tf.reshape(ids, [positions]), vocabulary, dtype=tf.float32)
        d_table = tf.matmul(one_hot, tf.reshape(dy, [positions, dimension]), transpose_a=True)
        # The ids carry no gradient; the training module never uses this first-layer output.
        return tf.zeros([batch_size, *in_shape]), [d_table]

    return LayerPlan(layer.name, [table], forward, backward)
