"""Norms of the update an encoded payload decodes to, computed in the codec's domain.

The rotation is orthonormal and subsampled coordinates decode to zero, so the L2 norm never
needs the rotation undone: it is the norm of the exact values plus, per segment (a tensor, or
a rotation block), the norm of the dequantized values (uniform), scale^2 * kept coordinates
(sign), or the values sent (top_k). The inf and L1 norms of rotated codecs need a full decode
(one inverse rotation, ~100 ms at a CNN's size); a rotated value is a row of its orthonormal
block times the block, so the largest block norm bounds the inf norm without it.

Sums of squares run in float32 with numpy's pairwise summation (relative error ~1e-8 at a
model's size, a quarter of the cost of float64) in one reused scratch buffer; a square that
overflows float32 (values above ~1.8e19) sends the computation to float64, so the norm of
any finite update is finite.
"""

from __future__ import annotations

import math

import numpy as np

from device_runtime.aggregation import quantization
from device_runtime.aggregation.codec import ParsedUpdate, UpdateCodec
from device_runtime.aggregation.codec_spec import SIGN, TOP_K, UNIFORM
from device_runtime.aggregation.norms import global_norm


class DecodedNormMeter:
    """Measures decoded updates of one round's codec (one scratch buffer, reused)."""

    def __init__(self, codec: UpdateCodec) -> None:
        self.codec = codec
        self._scratch = np.empty(max(codec.num_exact, codec.domain_size), np.float32)

    def needs_decode(self, order: float) -> bool:
        """Whether `norm(update, order)` undoes the rotation."""
        return self.codec.rotation is not None and order != 2.0

    def norm(self, update: ParsedUpdate, order: float) -> float:
        """The decoded update's norm of order 1, 2 or inf. `update` must be finite."""
        if order == 2.0:
            return math.sqrt(self.squares(update).total)
        codec = self.codec
        if codec.rotation is None and math.isinf(order):
            return self._max_abs(update)
        return float(global_norm(codec.decode_parsed(update).astype(np.float64), order))

    def max_abs_bound(self, update: ParsedUpdate, squares: Squares) -> float:
        """An upper bound of the inf norm (exact for unrotated codecs)."""
        if self.codec.rotation is None:
            return self._max_abs(update)
        block = float(squares.segments.max(initial=0.0))
        return max(_max_abs(update.exact), math.sqrt(block))

    def squares(self, update: ParsedUpdate) -> Squares:
        with np.errstate(over="ignore"):  # an overflow is caught below
            squares = self._squares(update, np.float32)
        if not math.isfinite(squares.total):
            squares = self._squares(update, np.float64)
        return squares

    def _squares(self, update: ParsedUpdate, dtype: type[np.floating]) -> Squares:
        codec, name = self.codec, self.codec.spec.name
        exact = _sum_of_squares(update.exact, self._buffer(update.exact.size, dtype))
        segments = np.zeros(codec.num_segments, np.float64)
        if not codec.num_compressed or name not in (TOP_K, SIGN, UNIFORM):
            return Squares(exact, segments)
        if name == TOP_K:  # segments are tensors; only the total is needed
            sent = _sum_of_squares(update.scalars, self._buffer(update.scalars.size, dtype))
            return Squares(exact + sent, segments)
        starts = codec.domain_starts
        if name == SIGN:
            segments = update.scalars.astype(np.float64) ** 2 * np.diff(starts)
        else:
            values = self._buffer(codec.domain_size, dtype)
            bits = codec.spec.bits
            for s in range(codec.num_segments):
                a, b = starts[s], starts[s + 1]
                low, high = update.scalars[2 * s], update.scalars[2 * s + 1]
                step = quantization.dequantize_step(low, high, bits)
                out = values[a:b]
                np.multiply(update.codes[a:b], step, out=out, dtype=out.dtype, casting="unsafe")
                out += out.dtype.type(low)
                segments[s] = _sum_of_squares(out, out)
        return Squares(exact + float(segments.sum()), segments)

    def _max_abs(self, update: ParsedUpdate) -> float:
        """The inf norm without a decode (unrotated codecs)."""
        codec = self.codec
        peak = _max_abs(update.exact)
        if not codec.num_compressed:
            return peak
        if codec.spec.name == TOP_K:
            return max(peak, _max_abs(update.scalars))
        assert codec.spec.name == UNIFORM
        starts, bits = codec.domain_starts, codec.spec.bits
        for s in range(codec.num_segments):
            codes = update.codes[starts[s] : starts[s + 1]]
            if not codes.size:
                continue
            low, high = update.scalars[2 * s], update.scalars[2 * s + 1]
            step = quantization.dequantize_step(low, high, bits)
            for code in (codes.min(), codes.max()):
                peak = max(peak, abs(float(low) + step * float(code)))
        return peak

    def _buffer(self, size: int, dtype: type[np.floating]) -> np.ndarray:
        if dtype is np.float32:
            return self._scratch[:size]
        return np.empty(size, dtype)


class Squares:
    """Sums of squares of one decoded update: in all, and per compressed segment."""

    def __init__(self, total: float, segments: np.ndarray) -> None:
        self.total = total
        self.segments = segments


def _sum_of_squares(values: np.ndarray, scratch: np.ndarray) -> float:
    if not values.size:
        return 0.0
    np.square(values, out=scratch, dtype=scratch.dtype, casting="unsafe")
    return float(scratch.sum())


def _max_abs(values: np.ndarray) -> float:
    if not values.size:
        return 0.0
    return max(abs(float(values.max())), abs(float(values.min())))
