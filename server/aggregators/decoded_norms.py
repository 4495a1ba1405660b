"""Norms of the update an encoded payload decodes to, computed in the codec's domain.

The rotation is orthonormal and subsampled coordinates decode to zero, so the L2 norm never
needs the rotation undone: for the uniform codec it is the norm of the dequantized values, for
the sign codec sum(scale^2 * kept coordinates), for top_k the norm of the values sent. The inf
and L1 norms of rotated codecs need a full decode (one inverse rotation).

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

    def norm(self, update: ParsedUpdate, order: float) -> float:
        """The decoded update's norm of order 1, 2 or inf. `update` must be finite."""
        if order == 2.0:
            with np.errstate(over="ignore"):  # an overflow is caught below
                squared = self._squared_norm(update, np.float32)
            if not math.isfinite(squared):
                squared = self._squared_norm(update, np.float64)
            return math.sqrt(squared)
        codec = self.codec
        if codec.rotation is None and math.isinf(order):
            return self._max_abs(update)
        return float(global_norm(codec.decode_parsed(update).astype(np.float64), order))

    def _squared_norm(self, update: ParsedUpdate, dtype: type[np.floating]) -> float:
        codec, name = self.codec, self.codec.spec.name
        total = _sum_of_squares(update.exact, self._buffer(update.exact.size, dtype))
        if not codec.num_compressed:
            return total
        if name == TOP_K:
            return total + _sum_of_squares(update.scalars, self._buffer(update.scalars.size, dtype))
        if name == SIGN:
            kept = np.diff(codec.domain_starts).astype(np.float64)
            scales = update.scalars.astype(np.float64)
            return total + float(np.dot(scales * scales, kept))
        assert name == UNIFORM
        values = self._buffer(codec.domain_size, dtype)
        self._dequantize_into(update, values)
        return total + _sum_of_squares(values, values)

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

    def _dequantize_into(self, update: ParsedUpdate, out: np.ndarray) -> None:
        codec = self.codec
        starts, bits = codec.domain_starts, codec.spec.bits
        for s in range(codec.num_segments):
            a, b = starts[s], starts[s + 1]
            low, high = update.scalars[2 * s], update.scalars[2 * s + 1]
            step = quantization.dequantize_step(low, high, bits)
            np.multiply(update.codes[a:b], step, out=out[a:b], dtype=out.dtype, casting="unsafe")
            out[a:b] += out.dtype.type(low)

    def _buffer(self, size: int, dtype: type[np.floating]) -> np.ndarray:
        if dtype is np.float32:
            return self._scratch[:size]
        return np.empty(size, dtype)


def _sum_of_squares(values: np.ndarray, scratch: np.ndarray) -> float:
    if not values.size:
        return 0.0
    np.square(values, out=scratch, dtype=scratch.dtype, casting="unsafe")
    return float(scratch.sum())


def _max_abs(values: np.ndarray) -> float:
    if not values.size:
        return 0.0
    return max(abs(float(values.max())), abs(float(values.min())))
