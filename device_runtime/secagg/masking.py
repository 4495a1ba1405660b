"""Masks and the arithmetic of masked vectors in Z_(2^b), b <= 32.

Vectors are numpy uint32: additions wrap modulo 2^32, and since 2^b divides 2^32 a final
`& (2^b - 1)` gives the value modulo 2^b. Masks are expanded from 32-byte seeds with the
AES-256-CTR keystream of `cryptography` (a PRG: the seed is the key, used for one mask only,
so the all-zero counter block is safe). On a wire a vector is little-endian uint32.
"""

from __future__ import annotations

import functools

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from device_runtime.secagg.errors import SecAggError

max_modulus_bits = 32
seed_bytes = 32
_zero_counter_block = bytes(16)


@functools.lru_cache(maxsize=4)
def _zeros(num_bytes: int) -> bytes:
    return bytes(num_bytes)


def check_modulus_bits(modulus_bits: int) -> None:
    if not 1 <= modulus_bits <= max_modulus_bits:
        raise ValueError(f"modulus_bits must be in [1, {max_modulus_bits}], got {modulus_bits}")


def reduce(vector: np.ndarray, modulus_bits: int) -> np.ndarray:
    """`vector` modulo 2^modulus_bits, in place when it is already uint32."""
    if modulus_bits < max_modulus_bits:
        vector &= np.uint32((1 << modulus_bits) - 1)
    return vector


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint32 values from a 32-byte seed (AES-256-CTR keystream)."""
    if len(seed) != seed_bytes:
        raise ValueError(f"mask seeds are {seed_bytes} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_zero_counter_block)).encryptor()
    return np.frombuffer(encryptor.update(_zeros(4 * length)), dtype="<u4")


def add_mask(accumulator: np.ndarray, seed: bytes) -> None:
    accumulator += expand_mask(seed, accumulator.size)


def subtract_mask(accumulator: np.ndarray, seed: bytes) -> None:
    accumulator -= expand_mask(seed, accumulator.size)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<u4").tobytes()


def from_bytes(data: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """Parses a wire vector. Raises SecAggError on a wrong size or a value >= 2^b."""
    if len(data) != 4 * length:
        raise SecAggError(
            f"a masked vector of {length} elements is {4 * length} bytes, got {len(data)}"
        )
    vector = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if modulus_bits < max_modulus_bits and int(vector.max(initial=0)) >> modulus_bits:
        raise SecAggError(f"masked vector has values outside Z_(2^{modulus_bits})")
    return vector
