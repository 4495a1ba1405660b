"""Every codec: lossless parts exact, unbiasedness where claimed, sizes, corrupt input refused."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.aggregation.codec import CodecAccumulator, UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecError, CodecSpec

SIZES = (3000, 40, 5000, 10)
N = sum(SIZES)


def _update(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


def _nmse(estimate: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((estimate - x) ** 2) / np.sum(x**2))


def _encode(codec: UpdateCodec, x: np.ndarray, rng: np.random.Generator) -> bytes:
    return codec.encode(x, UpdateFlags(0), codec.uniform_draws(rng))


def test_float32_codec_round_trips_exactly() -> None:
    codec = UpdateCodec(CodecSpec(), SIZES, seed=1)
    x = _update()

    payload = _encode(codec, x, np.random.default_rng(0))

    assert len(payload) == 4 + 4 * N
    np.testing.assert_array_equal(codec.decode(payload), x)


@pytest.mark.parametrize(
    "spec",
    [
        CodecSpec("uniform", bits=8, threshold=100),
        CodecSpec("sign", threshold=100),
        CodecSpec("top_k", threshold=100),
    ],
)
def test_small_tensors_below_the_threshold_travel_exactly(spec: CodecSpec) -> None:
    codec = UpdateCodec(spec, SIZES, seed=1)
    x = _update()

    decoded = codec.decode(_encode(codec, x, np.random.default_rng(0)))

    np.testing.assert_array_equal(decoded[3000:3040], x[3000:3040])
    np.testing.assert_array_equal(decoded[-10:], x[-10:])


@pytest.mark.parametrize("bits, rotation", [(8, False), (2, False), (3, True)])
def test_uniform_quantization_is_unbiased(bits: int, rotation: bool) -> None:
    codec = UpdateCodec(CodecSpec("uniform", bits=bits, threshold=0, rotation=rotation), SIZES, 3)
    x, rng = _update(), np.random.default_rng(1)
    single = codec.decode(_encode(codec, x, rng))
    accumulator = codec.new_accumulator()
    trials = 200

    for _ in range(trials):
        accumulator.add(codec.parse(_encode(codec, x, rng)), 1.0)

    # Independent rounding errors: the mean's error shrinks as 1/trials (unbiased).
    assert _nmse(accumulator.weighted_sum() / trials, x) < 3 * _nmse(single, x) / trials


def test_sign_codec_is_unbiased_over_rotations_and_near_drive_error() -> None:
    x, trials = _update(), 200
    total = np.zeros(N)
    errors = []

    for seed in range(trials):
        codec = UpdateCodec(CodecSpec("sign", threshold=0), SIZES, seed)
        decoded = codec.decode(_encode(codec, x, np.random.default_rng(0)))
        errors.append(_nmse(decoded, x))
        total += decoded

    # One encoding: DRIVE's pi/2 - 1 = 0.571; the mean over rotations converges to x.
    assert np.mean(errors) == pytest.approx(np.pi / 2 - 1, rel=0.1)
    assert _nmse(total / trials, x) < 3 * (np.pi / 2 - 1) / trials


def test_subsampled_sign_codec_sends_under_one_bit_and_stays_unbiased() -> None:
    x, trials = _update(), 200
    total = np.zeros(N)

    for seed in range(trials):
        codec = UpdateCodec(CodecSpec("sign", threshold=0, keep_fraction=0.9), SIZES, seed)
        total += codec.decode(_encode(codec, x, np.random.default_rng(0)))

    assert 8 * codec.payload_bytes / N < 0.95
    assert _nmse(total / trials, x) < 0.02


def test_top_k_keeps_the_largest_values_exactly() -> None:
    codec = UpdateCodec(CodecSpec("top_k", threshold=0, top_k_fraction=0.1), (100,), seed=1)
    x = np.linspace(-1, 1, 100).astype(np.float32)

    decoded = codec.decode(_encode(codec, x, np.random.default_rng(0)))

    kept = np.flatnonzero(decoded)
    assert kept.size == 10
    np.testing.assert_array_equal(decoded[kept], x[kept])
    assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()


@pytest.mark.parametrize(
    "spec",
    [
        CodecSpec("uniform", bits=8),
        CodecSpec("uniform", bits=4, threshold=0, rotation=True),
        CodecSpec("sign", keep_fraction=0.8),
        CodecSpec("top_k", threshold=0),
    ],
)
def test_merge_equals_sequential_accumulation(spec: CodecSpec) -> None:
    codec, rng = UpdateCodec(spec, SIZES, seed=4), np.random.default_rng(2)
    parsed = [codec.parse(_encode(codec, _update(s), rng)) for s in range(4)]
    sequential, left, right = (codec.new_accumulator() for _ in range(3))

    for i, update in enumerate(parsed):
        sequential.add(update, float(i + 1))
        (left if i < 2 else right).add(update, float(i + 1))
    left.merge(right)

    np.testing.assert_allclose(left.weighted_sum(), sequential.weighted_sum(), atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        CodecSpec(),
        CodecSpec("uniform", bits=4, threshold=0),
        CodecSpec("uniform", bits=3, threshold=0, rotation=True),
        CodecSpec("sign", threshold=0, keep_fraction=0.8),
        CodecSpec("top_k", threshold=0),
    ],
)
def test_sum_is_the_same_to_the_bit_whatever_the_pieces_it_is_added_in(spec: CodecSpec) -> None:
    codec, rng = UpdateCodec(spec, SIZES, seed=4), np.random.default_rng(2)
    payloads = [_encode(codec, _update(s), rng) for s in range(3)]
    whole, unpacked_first = codec.new_accumulator(), codec.new_accumulator()
    # Odd, so pieces start and end inside the bytes of packed codes.
    in_pieces = CodecAccumulator(codec, piece_size=7)

    for i, payload in enumerate(payloads):
        whole.add(codec.parse(payload), 0.1 * (i + 1))
        in_pieces.add(codec.parse(payload), 0.1 * (i + 1))
        update = codec.parse(payload)
        update.codes  # noqa: B018 (unpacked now, as the server's norm meter does)
        unpacked_first.add(update, 0.1 * (i + 1))

    assert whole.weighted_sum().tobytes() == in_pieces.weighted_sum().tobytes()
    assert whole.weighted_sum().tobytes() == unpacked_first.weighted_sum().tobytes()


def test_payload_sizes_match_the_bits_per_parameter_claimed() -> None:
    sizes = (1_000_000, 100)

    def bits(spec: CodecSpec) -> float:
        return 8 * UpdateCodec(spec, sizes, seed=1).payload_bytes / sum(sizes)

    assert bits(CodecSpec()) == pytest.approx(32.0, abs=0.01)
    assert 8.0 < bits(CodecSpec("uniform", bits=8)) < 8.01
    assert 1.0 < bits(CodecSpec("sign")) < 1.01
    assert bits(CodecSpec("sign", keep_fraction=0.95)) < 0.96


@pytest.mark.parametrize(
    "spec", [CodecSpec("uniform", bits=3, threshold=0), CodecSpec("sign", threshold=0)]
)
def test_wrong_length_bad_header_and_corrupt_stream_are_refused(spec: CodecSpec) -> None:
    codec = UpdateCodec(spec, SIZES, seed=1)
    payload = bytearray(_encode(codec, _update(), np.random.default_rng(0)))

    with pytest.raises(CodecError, match="expects"):
        codec.parse(bytes(payload[:-1]))
    for index, value in [(0, 2), (1, 0x80), (3, 1)]:
        bad = bytearray(payload)
        bad[index] = value
        with pytest.raises(CodecError):
            codec.parse(bytes(bad))
    corrupt = bytearray(payload)
    corrupt[-1] = 0xFF  # sets the zero padding bits after the last code
    with pytest.raises(CodecError, match="corrupt"):
        codec.parse(bytes(corrupt))


def test_top_k_indices_out_of_order_are_refused() -> None:
    codec = UpdateCodec(CodecSpec("top_k", threshold=0, top_k_fraction=0.5), (4,), seed=1)
    payload = bytearray(_encode(codec, np.array([4, 3, 2, 1], np.float32), np.random.default_rng()))
    payload[4] = 0b0001  # indices (1, 0): two-bit codes 01, 00

    with pytest.raises(CodecError, match="ascending"):
        codec.parse(bytes(payload))


@pytest.mark.parametrize("spec", [CodecSpec(), CodecSpec("uniform"), CodecSpec("sign")])
def test_non_finite_update_is_marked_non_finite(spec: CodecSpec) -> None:
    codec = UpdateCodec(spec, SIZES, seed=1)
    x = np.full(N, np.nan, np.float32)

    parsed = codec.parse(_encode(codec, x, np.random.default_rng(0)))

    assert not parsed.finite


def test_bad_codec_parameters_are_refused() -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        UpdateCodec(CodecSpec("gzip"), SIZES, 1)
    with pytest.raises(CodecError, match="power of two"):
        UpdateCodec(CodecSpec("sign", max_block_size=1000), SIZES, 1)
