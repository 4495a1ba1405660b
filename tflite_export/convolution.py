"""Conv2D as an explicit forward/backward in builtin ops, built around one patch matrix.

The forward pass lays the (padded) input out as a patch matrix (im2col) and multiplies it by
the kernel reshaped to [kh*kw*C, F]; the filter-gradient is the same patch matrix, transposed,
times the output-gradient. Both are BATCH_MATMULs, which LiteRT hands to XNNPACK even though
the kernel is a variable. CONV_2D is not handed over with a variable filter (XNNPACK wants a
constant one), and its fallback kernel was about half as fast on the McMahan CNN; the earlier
filter-gradient, a CONV_2D with the output-gradient as a 14x14 filter, was slower still.
Keeping the patches from the forward pass means the filter-gradient costs one matmul.

The input-gradient of a stride-1 convolution is the same scheme once more: the output-gradient,
padded, convolved with the kernel rotated by 180 degrees and its channel axes swapped, as
patches @ kernel. The TRANSPOSE_CONV it replaces (LiteRT's own kernel, a variable filter again)
took ~12 ms of the CNN's ~29 ms step; the patches cost ~11 MiB more resident memory. Strided
convolutions keep TRANSPOSE_CONV (their input-gradient would need zeros between the rows of the
output-gradient). The first layer's input-gradient is never used; the converter prunes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from tflite_export.errors import ExportError
from tflite_export.spatial_layers import check_channels_last, pair, same_padding

if TYPE_CHECKING:
    from tflite_export.layers import Cache, LayerPlan


def patch_indices(
    padded_size: tuple[int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    out: tuple[int, int],
) -> np.ndarray:
    """For each output cell (u, v), then kernel cell (i, j): the flat index of the padded input
    cell it reads, (u*sh + i) * W + (v*sw + j). Constant at export time."""
    (_, width), (kh, kw), (sh, sw), (oh, ow) = padded_size, kernel, strides, out
    u, v, i, j = np.meshgrid(
        np.arange(oh), np.arange(ow), np.arange(kh), np.arange(kw), indexing="ij"
    )
    return ((u * sh + i) * width + (v * sw + j)).reshape(-1).astype(np.int32)


def patch_matrix(
    padded: tf.Tensor, kernel: tuple[int, int], strides: tuple[int, int], out: tuple[int, int]
) -> tf.Tensor:
    """[B, H, W, C] (already padded) -> [B*oh*ow, kh*kw*C], columns ordered (i, j, c).

    Row (b, u, v), column (i, j, c) holds padded[b, u*sh + i, v*sw + j, c]: the order of an
    HWIO kernel reshaped to [kh*kw*C, F]. One GATHER over the flattened cells, with the index
    table as a constant: measured on the McMahan CNN's second layer it was 1.8x faster than
    concatenating shifted slices, and it writes the patches once, with no intermediate copies.
    """
    batch, height, width, channels = (int(d) for d in padded.shape)
    indices = patch_indices((height, width), kernel, strides, out)
    cells = tf.reshape(padded, [batch, height * width, channels])
    patches = tf.gather(cells, indices, axis=1)  # [B, oh*ow*kh*kw, C]
    return tf.reshape(patches, [batch * out[0] * out[1], kernel[0] * kernel[1] * channels])


def conv2d_plan(
    layer: tf.keras.layers.Conv2D, batch_size: int, in_shape: Sequence[int]
) -> list[LayerPlan]:
    from tflite_export.layers import LayerPlan

    check_channels_last(layer)
    if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise ExportError(
            f"layer {layer.name!r}: Conv2D with dilation {tuple(layer.dilation_rate)} or "
            f"groups {layer.groups} is not supported; supported: dilation 1, groups 1"
        )
    padding = layer.padding.upper()
    if padding not in ("VALID", "SAME"):
        raise ExportError(f"layer {layer.name!r}: padding {layer.padding!r} is not supported")
    height, width, channels = (int(d) for d in in_shape)
    kh, kw = pair(layer.kernel_size)
    sh, sw = pair(layer.strides)
    if padding == "SAME":
        oh, top, bottom = same_padding(height, kh, sh)
        ow, left, right = same_padding(width, kw, sw)
    else:
        oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
        top = bottom = left = right = 0
    kernel_value, *rest = layer.get_weights()
    filters = int(kernel_value.shape[3])
    params = [tf.Variable(kernel_value.astype(np.float32), name=f"{layer.name}/kernel")]
    if layer.use_bias:
        params.append(tf.Variable(rest[0].astype(np.float32), name=f"{layer.name}/bias"))
    x_shape = [batch_size, height, width, channels]
    kernel_rows = kh * kw * channels

    def forward(x: tf.Tensor, p: Sequence[tf.Variable], training: bool):
        padded = x
        if top or bottom or left or right:
            padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        patches = patch_matrix(padded, (kh, kw), (sh, sw), (oh, ow))
        z = tf.reshape(
            tf.matmul(patches, tf.reshape(p[0], [kernel_rows, filters])),
            [batch_size, oh, ow, filters],
        )
        return (z + p[1] if len(p) > 1 else z), (patches,)

    def input_gradient(dz: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        if (sh, sw) != (1, 1):
            return tf.nn.conv2d_transpose(
                dz, kernel, x_shape, strides=[1, sh, sw, 1], padding=padding
            )
        # dx[b, y, x, c] = sum_{i, j, o} dz_p[b, y + i, x + j, o] * K[kh-1-i, kw-1-j, c, o],
        # dz_p padded so that it is (height + kh - 1) x (width + kw - 1).
        before_h, before_w = kh - 1 - top, kw - 1 - left
        after_h, after_w = height + kh - 1 - oh - before_h, width + kw - 1 - ow - before_w
        padded = tf.pad(dz, [[0, 0], [before_h, after_h], [before_w, after_w], [0, 0]])
        rotated = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])  # [kh, kw, F, C]
        columns = patch_matrix(padded, (kh, kw), (1, 1), (height, width))
        dx = tf.matmul(columns, tf.reshape(rotated, [kh * kw * filters, channels]))
        return tf.reshape(dx, x_shape)

    def backward(cache: Cache, dz: tf.Tensor, p: Sequence[tf.Variable]):
        (patches,) = cache
        dx = input_gradient(dz, p[0])
        # dK[i, j, c, o] = sum_{b, u, v} padded[b, u*sh + i, v*sw + j, c] * dz[b, u, v, o].
        dz_rows = tf.reshape(dz, [batch_size * oh * ow, filters])
        dk = tf.matmul(patches, dz_rows, transpose_a=True)
        grads = [tf.reshape(dk, [kh, kw, channels, filters])]
        if len(p) > 1:
            grads.append(tf.reduce_sum(dz_rows, axis=0))
        return dx, grads

    return [LayerPlan(layer.name, params, forward, backward)]
