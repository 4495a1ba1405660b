"""Dense bit-packing: exact round trips, the documented byte layout, corrupt streams refused."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.aggregation.bitpack import (
    checked_stream,
    pack_bits,
    packed_size_bytes,
    unpack_bits,
    unpack_range,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 16, 32])
def test_round_trip_is_exact_and_wastes_no_bits(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001, dtype=np.uint64)

    packed = pack_bits(codes, bits)

    assert len(packed) == packed_size_bytes(1001, bits) == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), codes)


def test_layout_is_least_significant_bit_first() -> None:
    # 3-bit codes 1, 2, 7 -> stream bits 100 010 111 -> byte0 = 0b11010001, byte1 = 0b1.
    assert pack_bits(np.array([1, 2, 7]), 3) == bytes([0b11010001, 0b00000001])


def test_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_bits(b"\x00", 3, 3)


def test_nonzero_padding_is_refused_as_corrupt() -> None:
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(bytes([0b11010001, 0b10000001]), 3, 3)


def test_code_too_large_for_its_width_is_refused() -> None:
    with pytest.raises(ValueError, match="codes must lie"):
        pack_bits(np.array([8]), 3)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_a_range_unpacks_to_the_same_codes_as_the_whole_stream(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001, dtype=np.uint64)
    stream = checked_stream(pack_bits(codes, bits), bits, 1001)

    pieces = [unpack_range(stream, bits, a, b) for a, b in [(0, 1), (3, 500), (501, 1001)]]

    whole = unpack_bits(pack_bits(codes, bits), bits, 1001)
    for piece, (a, b) in zip(pieces, [(0, 1), (3, 500), (501, 1001)], strict=True):
        assert piece.dtype == whole.dtype
        np.testing.assert_array_equal(piece, whole[a:b])


def test_a_range_of_codes_that_straddle_bytes_is_refused() -> None:
    stream = checked_stream(pack_bits(np.arange(8), 3), 3, 8)

    with pytest.raises(ValueError, match="straddle"):
        unpack_range(stream, 3, 1, 4)
