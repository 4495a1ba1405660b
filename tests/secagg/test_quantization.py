import numpy as np
import pytest

from device_runtime.secagg.quantization import FixedPointQuantizer


def test_the_sum_of_quantized_vectors_decodes_to_the_float_sum() -> None:
    rng = np.random.default_rng(0)
    quantizer = FixedPointQuantizer(clip=1.0, modulus_bits=32, max_summands=100)
    inputs = [rng.uniform(-1, 1, 500).astype(np.float32) for _ in range(100)]

    total = np.zeros(500, np.uint64)
    for x in inputs:
        total += quantizer.quantize(x, rng)
    decoded = quantizer.dequantize_sum((total % (1 << 32)).astype(np.uint32), 100)

    step = 2.0 / ((1 << quantizer.value_bits) - 1)
    assert np.max(np.abs(decoded - np.sum(inputs, axis=0))) <= 100 * step + 1e-4


def test_headroom_prevents_wrapping_at_the_extremes() -> None:
    quantizer = FixedPointQuantizer(clip=0.5, modulus_bits=16, max_summands=1000)
    q = quantizer.quantize(np.full(3, 10.0), np.random.default_rng(0))  # clipped to +0.5

    assert int(q.max()) * 1000 < 1 << 16
    assert np.allclose(quantizer.dequantize_sum(q * 1000, 1000), 500.0)


def test_stochastic_rounding_is_unbiased() -> None:
    quantizer = FixedPointQuantizer(clip=1.0, modulus_bits=4, max_summands=1)
    x = np.full(20_000, 0.1)

    q = quantizer.quantize(x, np.random.default_rng(1))

    assert abs(float(quantizer.dequantize_sum(q.astype(np.uint32), 1).mean()) - 0.1) < 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0, "modulus_bits": 32, "max_summands": 2},
        {"clip": 1.0, "modulus_bits": 33, "max_summands": 2},
        {"clip": 1.0, "modulus_bits": 8, "max_summands": 256},
        {"clip": 1.0, "modulus_bits": 8, "max_summands": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FixedPointQuantizer(**kwargs)


def test_non_finite_values_are_refused() -> None:
    quantizer = FixedPointQuantizer(clip=1.0, modulus_bits=32, max_summands=2)

    with pytest.raises(ValueError, match="NaN"):
        quantizer.quantize(np.array([np.nan]), np.random.default_rng(0))
