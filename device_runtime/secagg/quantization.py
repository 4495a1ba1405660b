"""Fixed-point quantization of clipped floats into Z_(2^b), with headroom for n summands.

A float in [-clip, clip] maps affinely onto the integers [0, 2^q - 1] and is rounded
stochastically (unbiased: E[rounded] = exact). q = b - ceil(log2(n)) leaves room for n such
values to add up without wrapping modulo 2^b, so the secure sum of the integers decodes to the
sum of the floats (up to rounding noise of at most one step per summand and element).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from device_runtime.secagg import masking


@dataclasses.dataclass(frozen=True)
class FixedPointQuantizer:
    clip: float  # inputs are clipped elementwise to [-clip, clip]
    modulus_bits: int  # b
    max_summands: int  # n: how many quantized vectors may be summed without overflow

    def __post_init__(self) -> None:
        masking.check_modulus_bits(self.modulus_bits)
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be positive and finite, got {self.clip}")
        if self.max_summands < 1:
            raise ValueError(f"max_summands must be at least 1, got {self.max_summands}")
        if self.value_bits < 1:
            raise ValueError(
                f"{self.modulus_bits} bits leave no room for {self.max_summands} summands"
            )

    @property
    def value_bits(self) -> int:
        """q: bits of one quantized value."""
        return self.modulus_bits - math.ceil(math.log2(self.max_summands))

    @property
    def _levels(self) -> int:
        return (1 << self.value_bits) - 1

    def quantize(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clipped, scaled, stochastically rounded values in [0, 2^q - 1], as uint32."""
        if not np.all(np.isfinite(values)):
            raise ValueError("cannot quantize NaN or infinite values")
        scaled = (np.clip(values.astype(np.float64), -self.clip, self.clip) + self.clip) * (
            self._levels / (2 * self.clip)
        )
        floor = np.floor(scaled)
        rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
        return np.minimum(rounded, self._levels).astype(np.uint32)

    def dequantize_sum(self, total: np.ndarray, num_summands: int) -> np.ndarray:
        """The float sum of `num_summands` vectors from the sum of their quantized forms."""
        if not 0 < num_summands <= self.max_summands:
            raise ValueError(f"num_summands must be in [1, {self.max_summands}]")
        step = 2 * self.clip / self._levels
        return (total.astype(np.float64) * step - num_summands * self.clip).astype(np.float32)
