"""The client half of `secure_aggregator()`: a weighted mean computed by a secure sum.

As TFF's secure aggregator, the mean's numerator and its weights are both secure-summed:
the device clips its delta elementwise to [-clip, clip], scales it by its weight over
`max_weight` (weights above are capped), and appends the scaled weight as one more element.
Everything is quantized into Z_(2^b) with headroom for `max_summands` devices, so the server
gets sum(w x) and sum(w) from one sum and never a single device's update.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from device_runtime.secagg.quantization import FixedPointQuantizer


@dataclasses.dataclass(frozen=True)
class SecureMeanEncoding:
    clip: float
    max_weight: float
    max_summands: int
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        if not self.max_weight > 0:
            raise ValueError(f"max_weight must be positive, got {self.max_weight}")

    @property
    def quantizer(self) -> FixedPointQuantizer:
        return FixedPointQuantizer(self.clip, self.modulus_bits, self.max_summands)

    @staticmethod
    def vector_length(num_parameters: int) -> int:
        return num_parameters + 1

    def encode(self, delta: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """The device's secure-sum input. Raises ValueError on a negative or NaN weight."""
        if not weight >= 0:
            raise ValueError(f"weight must be non-negative, got {weight}")
        scale = min(weight / self.max_weight, 1.0)
        clipped = np.clip(delta.astype(np.float64), -self.clip, self.clip) * scale
        # The weight rides in the same field: scale in [0, 1] mapped onto [-clip, clip].
        weight_element = (2.0 * scale - 1.0) * self.clip
        return self.quantizer.quantize(np.append(clipped, weight_element), rng)

    def decode(self, total: np.ndarray, num_summands: int) -> tuple[np.ndarray, float]:
        """The weighted mean (float32) and the total weight, from the secure sum.

        Bounded whatever the summands were: a device may send any field elements, not the
        encoding of a clipped update, and no one sees its input. Every honest summand is an
        update of L2 norm <= clip times a scale in [0, 1], so every honest weighted mean lies
        in the L2 ball of radius `clip`; the mean returned is projected onto that ball, and
        the total weight clamped to [0, num_summands * max_weight]. So one malicious device
        moves the mean by at most 2 * clip in L2 norm (README, "Security").
        """
        sums = self.quantizer.dequantize_sum(total, num_summands).astype(np.float64)
        scale_sum = (sums[-1] + num_summands * self.clip) / (2.0 * self.clip)
        scale_sum = min(scale_sum, float(num_summands))
        if not scale_sum > 0:
            return np.zeros(total.size - 1, np.float32), 0.0
        mean = sums[:-1] / scale_sum
        norm = float(np.sqrt(np.dot(mean, mean)))
        if norm > self.clip:
            mean *= self.clip / norm
        return mean.astype(np.float32), float(scale_sum * self.max_weight)
