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


def checked_stream(data: bytes | memoryview | np.ndarray, bits: int, count: int) -> np.ndarray:
    """`data` as uint8, once it is a well-formed stream of `count` codes of `bits` bits.

    Raises ValueError if `data` is not exactly `packed_size_bytes(count, bits)` long or its
    padding bits are not zero (a corrupt stream).
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between 1 and {MAX_BITS}, got {bits}")
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    expected = packed_size_bytes(count, bits)
    if raw.size != expected:
        raise ValueError(f"{count} codes of {bits} bits take {expected} bytes, got {raw.size}")
    used_bits = count * bits
    if used_bits % 8 and int(raw[-1]) >> (used_bits % 8):
        raise ValueError("nonzero padding bits after the last code: corrupt bit stream")
    return raw


def unpack_bits(data: bytes | memoryview | np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` codes packed in `data` (uint8 for bits <= 8, wider otherwise).

    Raises ValueError as `checked_stream` does.
    """
    raw = checked_stream(data, bits, count)
    return _unpack(raw, bits, count)


def whole_codes_per_byte(bits: int) -> bool:
    """Whether codes of this width never straddle a byte, so any range unpacks on its own."""
    return bits in (1, 2, 4, 8, 16, 32)


def unpack_range(raw: np.ndarray, bits: int, start: int, end: int) -> np.ndarray:
    """Codes [start, end) of a stream that passed `checked_stream`, unpacking only their bytes.

    For widths where `whole_codes_per_byte`; the same values as `unpack_bits(...)[start:end]`.
    """
    if not whole_codes_per_byte(bits):
        raise ValueError(f"codes of {bits} bits straddle bytes: unpack the whole stream")
    if bits >= 8:
        size = bits // 8
        return _unpack(raw[start * size : end * size], bits, end - start)
    per_byte = 8 // bits
    first, last = start // per_byte, -(-end // per_byte)
    codes = _unpack(raw[first:last], bits, (last - first) * per_byte)
    skip = start - first * per_byte
    return codes[skip : skip + end - start]


def _unpack(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return raw
    if bits == 16:
        return raw.view("<u2")
    if bits == 32:
        return raw.view("<u4")
    if bits in (2, 4):
        return _spread_small_codes(raw, bits)[:count]
    stream = np.unpackbits(raw, count=count * bits, bitorder="little")
    if bits == 1:
        return stream
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    dtype = np.uint8 if bits <= 8 else np.uint32
    return (stream.reshape(count, bits).astype(np.uint32) @ weights).astype(dtype)


# Whole codes per byte (2 or 4 bits): widen each byte to a little-endian word with one byte
# per code, move code j up by j * (8 - bits) bits, mask, and read the word's bytes. Shifting
# by doubling (x | x << s, then that | itself << 2s) needs log2(codes per byte) steps of
# contiguous passes; shifting into strided columns of a (bytes, codes) matrix costs ~3x more.
_WORDS: dict[int, tuple[np.dtype[np.unsignedinteger], int]] = {
    4: (np.dtype("<u2"), 0x0F0F),
    2: (np.dtype("<u4"), 0x03030303),
}


def _spread_small_codes(raw: np.ndarray, bits: int) -> np.ndarray:
    word, mask = _WORDS[bits]
    spread = raw.astype(word)
    moved = np.empty_like(spread)
    shift, placed = 8 - bits, 1  # codes already in their own byte
    while placed < 8 // bits:
        np.left_shift(spread, shift, out=moved)
        np.bitwise_or(spread, moved, out=spread)
        shift, placed = 2 * shift, 2 * placed
    np.bitwise_and(spread, mask, out=spread)
    return spread.view(np.uint8)
