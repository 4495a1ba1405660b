"""Dense bit-packing of unsigned codes: `bits` bits per value, no bit wasted between values.

Layout (the wire format every client must reproduce byte for byte): value i occupies bits
[i * bits, (i + 1) * bits) of the stream, least significant bit first, and stream bit j is bit
(j % 8) of byte j // 8. Only the last byte may hold padding, which is zero.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 32


def packed_size_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Packs unsigned integer codes, each < 2**bits, into `packed_size_bytes` bytes."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, 2**{bits})")
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    if bits == 16:
        return codes.astype("<u2").tobytes()
    if bits == 32:
        return codes.astype("<u4").tobytes()
    if bits == 1:
        return np.packbits(codes.astype(np.uint8), bitorder="little").tobytes()
    # General width: one row of `bits` little-endian bits per code, then one flat bit stream.
    shifts = np.arange(bits, dtype=np.uint64)
    matrix = (codes.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    return np.packbits(matrix.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview | np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` codes packed in `data` (uint8 for bits <= 8, wider otherwise).

    Raises ValueError if `data` is not exactly `packed_size_bytes(count, bits)` long or its
    padding bits are not zero (a corrupt stream).
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    expected = packed_size_bytes(count, bits)
    if raw.size != expected:
        raise ValueError(f"{count} codes of {bits} bits take {expected} bytes, got {raw.size}")
    if bits == 8:
        return raw
    if bits == 16:
        return raw.view("<u2")
    if bits == 32:
        return raw.view("<u4")
    used_bits = count * bits
    if used_bits % 8 and int(raw[-1]) >> (used_bits % 8):
        raise ValueError("nonzero padding bits after the last code: corrupt bit stream")
    if bits in (2, 4):
        # Whole codes per byte: shift and mask each byte (much faster than a bit matrix).
        per_byte, mask = 8 // bits, (1 << bits) - 1
        codes = np.empty((raw.size, per_byte), np.uint8)
        for j in range(per_byte):
            np.right_shift(raw, bits * j, out=codes[:, j])
        codes &= mask
        return codes.ravel()[:count]
    stream = np.unpackbits(raw, count=used_bits, bitorder="little")
    if bits == 1:
        return stream
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    dtype = np.uint8 if bits <= 8 else np.uint32
    return (stream.reshape(count, bits).astype(np.uint32) @ weights).astype(dtype)
