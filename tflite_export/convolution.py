"""Conv2D as an explicit forward/backward in builtin ops, built around patch matrices.

The forward pass lays the (padded) input out as a patch matrix (im2col) and multiplies it by
the kernel reshaped to [kh*kw*C, F], a BATCH_MATMUL, which LiteRT hands to XNNPACK even though
the kernel is a variable. CONV_2D is not handed over with a variable filter (XNNPACK wants a
constant one), and its fallback kernel was about half as fast on the McMahan CNN.

The input-gradient of a stride-1 convolution is the same scheme once more: the output-gradient,
padded, convolved with the kernel rotated by 180 degrees and its channel axes swapped, as
columns @ kernel. The TRANSPOSE_CONV it replaces (LiteRT's own kernel, a variable filter again)
took ~12 ms of the CNN's ~29 ms step. The filter-gradient reads the same columns: it is the
layer's input, transposed, times the columns. So the forward pass keeps only its input, not its
patches, and no patch matrix outlives the matmuls that read it.

Patch matrices are the largest tensors of a training step (the CNN's second layer: 12 MiB of
patches and 24 MiB of columns at batch 20), so both passes build them a chunk of the batch at a
time (`chunking.patch_chunk_bytes`): each chunk's matrix dies after its matmuls and the arena
gives every chunk the same slot. The device runtime turns LiteRT's delegate clustering off so
that the chunks run in this order (see `device_runtime.model_runner`).

Strided convolutions, and the first layer (whose input-gradient is never used), keep the
forward's patches for a filter-gradient of patches^T @ output-gradient; strided ones keep
TRANSPOSE_CONV for the input-gradient (it would need zeros between the rows of the
output-gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tflite_export.chunking import even_ranges, patch_chunk_bytes
from tflite_export.errors import ExportError
from tflite_export.layer_plan import Cache, LayerPlan, layer_weight
from tflite_export.spatial_layers import check_channels_last, pair, same_padding
from tflite_export.weight_penalties import weight_penalty


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
    layer: tf.keras.layers.Conv2D,
    batch_size: int,
    in_shape: Sequence[int],
    needs_input_gradient: bool = True,
) -> list[LayerPlan]:
    check_channels_last(layer)
    if tuple(layer.dilation_rate) != (1, 1):
        raise ExportError(
            f"layer {layer.name!r}: Conv2D with dilation_rate {tuple(layer.dilation_rate)} is "
            "not supported; supported: dilation_rate (1, 1)"
        )
    if layer.groups != 1:
        raise ExportError(
            f"layer {layer.name!r}: Conv2D with groups {layer.groups} is not supported; "
            "supported: groups 1"
        )
    padding = layer.padding.upper()
    if padding not in ("VALID", "SAME"):
        raise ExportError(
            f"layer {layer.name!r}: padding {layer.padding!r} is not supported; "
            "supported: 'valid' and 'same'"
        )
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
    trainable = bool(layer.trainable)
    params = [layer_weight(kernel_value, trainable, f"{layer.name}/kernel")]
    penalties = [weight_penalty(layer, "kernel_regularizer")]
    tensors = [(f"{layer.name}/kernel", tuple(int(d) for d in kernel_value.shape))]
    if layer.use_bias:
        params.append(layer_weight(rest[0], trainable, f"{layer.name}/bias"))
        penalties.append(weight_penalty(layer, "bias_regularizer"))
        tensors.append((f"{layer.name}/bias", (filters,)))
    x_shape = [batch_size, height, width, channels]
    kernel_rows = kh * kw * channels
    # Stride 1 with an input-gradient: the filter-gradient reads the input-gradient's columns
    # and needs no patches after the forward pass. Otherwise the forward keeps its patches.
    from_columns = needs_input_gradient and (sh, sw) == (1, 1)
    forward_chunks = (
        even_ranges(batch_size, 4 * oh * ow * kernel_rows, patch_chunk_bytes)
        if from_columns
        else [(0, batch_size)]
    )
    column_chunks = even_ranges(
        batch_size, 4 * height * width * kh * kw * filters, patch_chunk_bytes
    )

    def forward(x: tf.Tensor, p: Sequence[tf.Tensor], noise: tf.Tensor | None):
        padded = x
        if top or bottom or left or right:
            padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        kernel = tf.reshape(p[0], [kernel_rows, filters])
        rows, patches = [], None
        # Chunk by chunk: each chunk's patches die after its matmul.
        for a, b in forward_chunks:
            part = padded if (a, b) == (0, batch_size) else padded[a:b]
            patches = patch_matrix(part, (kh, kw), (sh, sw), (oh, ow))
            rows.append(tf.matmul(patches, kernel))
        z = tf.reshape(
            rows[0] if len(rows) == 1 else tf.concat(rows, 0), [batch_size, oh, ow, filters]
        )
        z = z + p[1] if len(p) > 1 else z
        return z, ((x,) if from_columns else (patches,))

    def patches_backward(cache: Cache, dz: tf.Tensor, kernel: tf.Tensor):
        (patches,) = cache
        # dK[i, j, c, o] = sum_{b, u, v} padded[b, u*sh + i, v*sw + j, c] * dz[b, u, v, o].
        dz_rows = tf.reshape(dz, [batch_size * oh * ow, filters])
        dk = tf.reshape(tf.matmul(patches, dz_rows, transpose_a=True), [kh, kw, channels, filters])
        dx = (
            tf.nn.conv2d_transpose(dz, kernel, x_shape, strides=[1, sh, sw, 1], padding=padding)
            if needs_input_gradient
            else tf.zeros(x_shape)  # never read: the training module drops it
        )
        return dx, dk

    def columns_backward(cache: Cache, dz: tf.Tensor, kernel: tf.Tensor):
        (x,) = cache
        # Columns of the output-gradient, padded so that it is (height + kh - 1) x
        # (width + kw - 1): row (b, y, x), column (i, j, o) holds dz[b, y + i - kh + 1 + top,
        # x + j - kw + 1 + left, o] (zero outside). Both gradients read them:
        #   dx[b, y, x, c] = sum_{i, j, o} columns[(b, y, x), (i, j, o)] * K[kh-1-i, kw-1-j, c, o]
        #   dK[kh-1-i, kw-1-j, c, o] = sum_{b, y, x} x[b, y, x, c] * columns[(b, y, x), (i, j, o)]
        before_h, before_w = kh - 1 - top, kw - 1 - left
        after_h, after_w = height + kh - 1 - oh - before_h, width + kw - 1 - ow - before_w
        padded = tf.pad(dz, [[0, 0], [before_h, after_h], [before_w, after_w], [0, 0]])
        rotated = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])  # [kh, kw, F, C]
        rotated = tf.reshape(rotated, [kh * kw * filters, channels])
        x_rows = tf.reshape(x, [batch_size * height * width, channels])
        dx_parts, dk_flipped = [], None
        # Chunk by chunk: the planner gives every chunk's columns the same arena slot.
        for a, b in column_chunks:
            part = padded if (a, b) == (0, batch_size) else padded[a:b]
            columns = patch_matrix(part, (kh, kw), (1, 1), (height, width))
            dx_parts.append(tf.matmul(columns, rotated))
            x_part = x_rows[a * height * width : b * height * width]
            term = tf.matmul(x_part, columns, transpose_a=True)  # [C, kh*kw*F]
            dk_flipped = term if dk_flipped is None else dk_flipped + term
        dx = dx_parts[0] if len(dx_parts) == 1 else tf.concat(dx_parts, 0)
        dk = tf.reverse(tf.reshape(dk_flipped, [channels, kh, kw, filters]), [1, 2])
        return tf.reshape(dx, x_shape), tf.transpose(dk, [1, 2, 0, 3])

    def backward(cache: Cache, dz: tf.Tensor, p: Sequence[tf.Tensor]):
        gradients = columns_backward if from_columns else patches_backward
        dx, dk = gradients(cache, dz, p[0])
        grads = [dk]
        if len(p) > 1:
            grads.append(tf.reduce_sum(tf.reshape(dz, [-1, filters]), axis=0))
        return dx, grads

    return [
        LayerPlan(
            layer.name,
            params,
            forward,
            backward,
            tensors=tensors,
            trainable=trainable,
            penalties=penalties,
        )
    ]
