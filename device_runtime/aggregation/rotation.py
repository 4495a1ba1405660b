"""Randomized Hadamard rotation, in blocks whose sizes are powers of two (no padding).

A vector of n values is cut into blocks: as many blocks of `max_block_size` as fit, then the
remainder split into its binary powers of two, largest first (n = 100 -> 64, 32, 4). Each
block is multiplied by Rademacher signs, then by the orthonormal Walsh-Hadamard matrix
H / sqrt(size). The rotated vector has exactly n values, so no bit is spent on padding.

The signs come from the round's seed through SHAKE-128 (FIPS 202), so a device written in any
language derives the same rotation as the coordinator: `shared_bits(label, seed, n)`.
"""

from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_MAX_BLOCK_SIZE = 1 << 16
ROTATION_LABEL = b"overnight/rotation/v1"


def shared_stream(label: bytes, seed: int, num_bytes: int) -> np.ndarray:
    """`num_bytes` pseudo-random bytes that device and coordinator derive from the round seed."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be a 64-bit unsigned integer, got {seed}")
    digest = hashlib.shake_128(label + seed.to_bytes(8, "little")).digest(num_bytes)
    return np.frombuffer(digest, np.uint8)


def block_sizes(n: int, max_block_size: int = DEFAULT_MAX_BLOCK_SIZE) -> list[int]:
    if max_block_size < 1 or max_block_size & (max_block_size - 1):
        raise ValueError(f"max_block_size must be a power of two, got {max_block_size}")
    sizes = [max_block_size] * (n // max_block_size)
    remainder = n % max_block_size
    bit = max_block_size >> 1
    while remainder:
        if remainder & bit:
            sizes.append(bit)
            remainder -= bit
        bit >>= 1
    return sizes


def _walsh_hadamard(blocks: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of each row (length a power of two).

    Butterflies in the order h = 1, 2, 4, ...: (a, b) -> (a + b, a - b); then / sqrt(size).
    """
    rows, size = blocks.shape
    out = blocks
    h = 1
    while h < size:
        pairs = out.reshape(rows, size // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        out = np.stack((a + b, a - b), axis=2)
        h *= 2
    return out.reshape(rows, size) / np.sqrt(size)


class RandomizedHadamard:
    """The rotation of one round for vectors of `n` values. Orthonormal: inverse = transpose."""

    def __init__(self, n: int, seed: int, max_block_size: int = DEFAULT_MAX_BLOCK_SIZE) -> None:
        self.n = n
        self.sizes = block_sizes(n, max_block_size)
        self.starts = np.cumsum([0, *self.sizes]).astype(np.int64)
        bits = np.unpackbits(shared_stream(ROTATION_LABEL, seed, (n + 7) // 8), bitorder="little")
        # Stream bit 1 means -1.
        self.signs = (1.0 - 2.0 * bits[:n]).astype(np.float64)

    def _per_block(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(self.n, np.float64)
        start = 0
        # Equal-sized consecutive blocks (all the full ones) are transformed in one call.
        for size in sorted(set(self.sizes), reverse=True):
            count = self.sizes.count(size)
            end = start + size * count
            out[start:end] = _walsh_hadamard(x[start:end].reshape(count, size)).ravel()
            start = end
        return out

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """H D x in float64 (float64, so every implementation rounds the same way)."""
        if x.shape != (self.n,):
            raise ValueError(f"rotation is for {self.n} values, got shape {x.shape}")
        return self._per_block(x.astype(np.float64) * self.signs)

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        """D H y: the inverse of `rotate`."""
        if y.shape != (self.n,):
            raise ValueError(f"rotation is for {self.n} values, got shape {y.shape}")
        return self._per_block(y.astype(np.float64)) * self.signs
