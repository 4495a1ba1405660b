"""What a round's update codec is: name and parameters, shared by device and coordinator."""

from __future__ import annotations

import dataclasses
import math

from device_runtime.aggregation.rotation import DEFAULT_MAX_BLOCK_SIZE

# Codec names on the wire (AggregationSpec.codec).
FLOAT32 = "float32"  # every value exact
UNIFORM = "uniform"  # stochastic uniform quantization, per-segment range; optional rotation
SIGN = "sign"  # DRIVE: rotation, 1 bit per kept coordinate, one unbiased scale per block
TOP_K = "top_k"  # the largest magnitudes of each tensor, exact (biased)
CODECS = (FLOAT32, UNIFORM, SIGN, TOP_K)


class CodecError(ValueError):
    """An encoded update (or a codec's parameters) does not match the round's codec."""


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    name: str = FLOAT32
    bits: int = 8  # uniform: bits per value
    threshold: int = 20000  # tensors with more elements than this are compressed, others exact
    rotation: bool = False  # uniform: randomized Hadamard rotation first (sign: always)
    keep_fraction: float = 1.0  # sign: share of rotated coordinates sent (EDEN-style, < 1 bit)
    top_k_fraction: float = 0.01  # top_k: share of each compressed tensor's values sent
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE  # rotation blocks (a power of two)

    @property
    def rotated(self) -> bool:
        return self.name == SIGN or (self.name == UNIFORM and self.rotation)

    def validate(self) -> CodecSpec:
        """Raises CodecError naming the parameter that is out of range."""
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r}; known: {', '.join(CODECS)}")
        if self.name == UNIFORM and not 1 <= self.bits <= 16:
            raise CodecError(f"uniform codec: bits must be between 1 and 16, got {self.bits}")
        if self.threshold < 0:
            raise CodecError(f"codec threshold must be >= 0, got {self.threshold}")
        if not (math.isfinite(self.keep_fraction) and 0 < self.keep_fraction <= 1):
            raise CodecError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not (math.isfinite(self.top_k_fraction) and 0 < self.top_k_fraction <= 1):
            raise CodecError(f"top_k_fraction must be in (0, 1], got {self.top_k_fraction}")
        size = self.max_block_size
        if size < 1 or size & (size - 1):
            raise CodecError(f"max_block_size must be a power of two, got {size}")
        return self
