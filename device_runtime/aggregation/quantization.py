"""Scalar quantizers of one segment (a tensor, or a block of a rotated vector).

Randomness is passed in as uniform draws in [0, 1), one per value: the device draws them from
its own seeded generator, and golden test vectors record them so that an encoder written in
another language can be checked byte for byte.
"""

from __future__ import annotations

import numpy as np


def quantize_stochastic(
    x: np.ndarray, bits: int, uniforms: np.ndarray
) -> tuple[np.float32, np.float32, np.ndarray]:
    """Uniform stochastic quantization over [min(x), max(x)] with 2**bits levels.

    Returns (low, high, codes). Unbiased: E[low + code * step] = x, where
    step = (high - low) / (2**bits - 1) computed in float64 from the float32 bounds.
    """
    levels = (1 << bits) - 1
    low, high = np.float32(x.min()), np.float32(x.max())
    if not (np.isfinite(low) and np.isfinite(high)) or high == low:
        # Constant (or non-finite, which the server zeroes): the bounds carry everything.
        return low, high, np.zeros(x.size, np.uint32)
    step = (np.float64(high) - np.float64(low)) / levels
    scaled = (x.astype(np.float64) - np.float64(low)) / step
    codes = np.floor(scaled + uniforms)
    return low, high, np.clip(codes, 0, levels).astype(np.uint32)


def dequantize_step(low: np.float32, high: np.float32, bits: int) -> float:
    return (float(high) - float(low)) / ((1 << bits) - 1)


def sign_scale(y: np.ndarray) -> np.float32:
    """DRIVE's unbiased scale for a rotated block: ||y||_2^2 / ||y||_1 (0 for a zero block).

    With a uniformly random rotation, scale * sign(y), rotated back, is an unbiased estimate
    of the original vector (Vargaftik et al., NeurIPS 2021).
    """
    l1 = float(np.abs(y).sum())
    if l1 == 0.0:
        return np.float32(0.0)
    return np.float32(float(np.dot(y, y)) / l1)


def sign_bits(y: np.ndarray) -> np.ndarray:
    """1 where the value is negative, 0 otherwise (zero counts as positive)."""
    return (y < 0).astype(np.uint8)


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest magnitudes, ascending; ties go to the lower index."""
    order = np.argsort(-np.abs(x), kind="stable")[:k]
    return np.sort(order)
