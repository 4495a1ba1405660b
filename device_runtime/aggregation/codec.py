"""The encoded update: one implementation of every codec, used by devices and the coordinator.

Payload layout (little-endian), fully determined by the codec spec, the model's tensor sizes
and the round seed, so its exact length is known before it is read:

    header       4 bytes: format version (1), flags (see `UpdateFlags`), two zero bytes
    exact        float32 values of every tensor with at most `threshold` elements, in order
    compressed   the concatenation of the other tensors (the "compressed vector"), as:
      float32    nothing (every tensor is exact)
      uniform    float32 (low, high) per segment, then one dense stream of `bits`-bit codes
      sign       float32 scale per block, then one bit per kept rotated coordinate (1 = minus)
      top_k      per tensor: k indices at ceil(log2 n) bits (ascending), then k float32 values

Segments are the tensors of the compressed vector, or with rotation the blocks of the rotated
compressed vector (see rotation.py). Bit streams are packed as bitpack.py describes.

The server side adds decoded updates into a `CodecAccumulator` in the codec's own domain
(rotated, and compact when coordinates are subsampled), keeping per-segment offsets as scalars;
the rotation is undone once per round in `finalize`, which is what makes accumulating an
encoded update about as cheap as adding a float32 vector.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Sequence

import numpy as np

from device_runtime.aggregation import bitpack, quantization
from device_runtime.aggregation.codec_spec import (
    FLOAT32,
    SIGN,
    TOP_K,
    UNIFORM,
    CodecError,
    CodecSpec,
)
from device_runtime.aggregation.rotation import RandomizedHadamard, shared_stream

FORMAT_VERSION = 1
HEADER_BYTES = 4
SUBSAMPLE_LABEL = b"overnight/subsample/v1"
_SUBSAMPLE_LEVELS = 1 << 16
_NO_STREAM = np.zeros(0, np.uint8)


class UpdateFlags(enum.IntFlag):
    """What the client half did to the update, for the server halves' measurements."""

    ZEROED = 1  # the update's norm exceeded the zeroing bound; it was sent as zeros
    CLIPPED = 2  # the update's L2 norm exceeded the clipping bound; it was scaled down
    BELOW_ZEROING_ESTIMATE = 4  # vote of the adaptive zeroing-norm quantile estimate
    BELOW_CLIPPING_ESTIMATE = 8  # vote of the adaptive clipping-norm quantile estimate


_ALL_FLAGS = int(
    UpdateFlags.ZEROED
    | UpdateFlags.CLIPPED
    | UpdateFlags.BELOW_ZEROING_ESTIMATE
    | UpdateFlags.BELOW_CLIPPING_ESTIMATE
)


def _index_bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


@dataclasses.dataclass
class ParsedUpdate:
    """Views into a payload that passed every structural check.

    The codes stay packed until asked for: the accumulator unpacks them piece by piece into
    its cache-sized scratch, which saves a model-sized pass and allocation per update.
    """

    flags: UpdateFlags
    exact: np.ndarray  # float32
    scalars: np.ndarray  # float32: (low, high) pairs, scales or top-k values, per codec
    stream: np.ndarray  # uint8: the checked bit stream of the codes
    code_bits: int
    code_count: int
    _codes: np.ndarray | None = None

    @property
    def codes(self) -> np.ndarray:
        """Unpacked codes (uniform), sign bits (sign) or indices (top_k)."""
        if self._codes is None:
            self._codes = bitpack.unpack_bits(self.stream, self.code_bits, self.code_count)
        return self._codes

    def code_range(self, start: int, end: int) -> np.ndarray:
        """codes[start:end], unpacking only those when the codes are still packed."""
        if self._codes is not None or not bitpack.whole_codes_per_byte(self.code_bits):
            return self.codes[start:end]
        return bitpack.unpack_range(self.stream, self.code_bits, start, end)

    @property
    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.exact)) and np.all(np.isfinite(self.scalars)))


class UpdateCodec:
    """The codec of one round for one model layout."""

    def __init__(self, spec: CodecSpec, tensor_sizes: Sequence[int], seed: int) -> None:
        self.spec = spec.validate()
        if not tensor_sizes or min(tensor_sizes) < 1:
            raise CodecError(f"tensor sizes must be positive, got {list(tensor_sizes)}")
        self.tensor_sizes = tuple(int(s) for s in tensor_sizes)
        self.num_parameters = sum(self.tensor_sizes)
        self.seed = seed
        starts = [0, *itertools.accumulate(self.tensor_sizes)]
        compress = [spec.name != FLOAT32 and s > spec.threshold for s in self.tensor_sizes]
        ranges = list(zip(starts[:-1], starts[1:], strict=True))
        self.exact_ranges = [r for r, c in zip(ranges, compress, strict=True) if not c]
        self.compressed_ranges = [r for r, c in zip(ranges, compress, strict=True) if c]
        self.num_exact = sum(b - a for a, b in self.exact_ranges)
        self.num_compressed = self.num_parameters - self.num_exact
        self.rotation: RandomizedHadamard | None = None
        self.kept: np.ndarray | None = None  # sorted kept coordinates of the rotated vector
        self.keep_probability = 1.0
        if spec.rotated and self.num_compressed:
            self.rotation = RandomizedHadamard(self.num_compressed, seed, spec.max_block_size)
            segment_sizes = self.rotation.sizes
        else:
            segment_sizes = [b - a for a, b in self.compressed_ranges]
        self.segment_starts = np.cumsum([0, *segment_sizes]).astype(np.int64)
        if spec.name == SIGN and spec.keep_fraction < 1.0 and self.num_compressed:
            threshold = round(spec.keep_fraction * _SUBSAMPLE_LEVELS)
            draws = shared_stream(SUBSAMPLE_LABEL, seed, 2 * self.num_compressed).view("<u2")
            self.kept = np.flatnonzero(draws < threshold)
            self.keep_probability = threshold / _SUBSAMPLE_LEVELS
            # Segment boundaries in the compact domain of kept coordinates.
            self.domain_starts = np.searchsorted(self.kept, self.segment_starts)
        else:
            self.domain_starts = self.segment_starts
        self.num_segments = len(segment_sizes)
        self.domain_size = int(self.domain_starts[-1])
        self._layout = self._section_sizes()
        self.payload_bytes = HEADER_BYTES + sum(self._layout)

    # ----- layout --------------------------------------------------------------------------

    def _section_sizes(self) -> list[int]:
        """Bytes of: exact values, scalars, code stream."""
        exact = 4 * self.num_exact
        name = self.spec.name
        if name == FLOAT32 or not self.num_compressed:
            return [exact, 0, 0]
        if name == UNIFORM:
            return [
                exact,
                8 * self.num_segments,
                bitpack.packed_size_bytes(self.num_compressed, self.spec.bits),
            ]
        if name == SIGN:
            return [exact, 4 * self.num_segments, bitpack.packed_size_bytes(self.domain_size, 1)]
        assert name == TOP_K
        streams = sum(
            bitpack.packed_size_bytes(self._top_k(b - a), _index_bits(b - a))
            + 4 * self._top_k(b - a)
            for a, b in self.compressed_ranges
        )
        return [exact, 0, streams]

    def _top_k(self, n: int) -> int:
        return max(1, int(np.ceil(self.spec.top_k_fraction * n)))

    def _split(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        exact = np.concatenate([delta[a:b] for a, b in self.exact_ranges] or [np.zeros(0)])
        compressed = np.concatenate(
            [delta[a:b] for a, b in self.compressed_ranges] or [np.zeros(0)]
        )
        return exact.astype("<f4"), compressed.astype(np.float32)

    # ----- client half ---------------------------------------------------------------------

    def uniform_draws(self, rng: np.random.Generator) -> np.ndarray:
        """The private randomness `encode` needs: stochastic rounding draws (uniform codec)."""
        return rng.random(self.num_compressed) if self.spec.name == UNIFORM else np.zeros(0)

    def encode(self, delta: np.ndarray, flags: UpdateFlags, uniforms: np.ndarray) -> bytes:
        """Encodes a float32 update of the model's size. Deterministic given `uniforms`."""
        if delta.shape != (self.num_parameters,):
            raise CodecError(f"update has shape {delta.shape}, expected ({self.num_parameters},)")
        exact, compressed = self._split(delta)
        parts = [bytes([FORMAT_VERSION, int(flags), 0, 0]), exact.tobytes()]
        name = self.spec.name
        if name == FLOAT32 or not self.num_compressed:
            pass
        elif name == UNIFORM:
            values = compressed if self.rotation is None else self.rotation.rotate(compressed)
            bounds = np.empty(2 * self.num_segments, "<f4")
            codes = np.empty(self.num_compressed, np.uint32)
            for s in range(self.num_segments):
                a, b = self.segment_starts[s], self.segment_starts[s + 1]
                low, high, codes[a:b] = quantization.quantize_stochastic(
                    values[a:b], self.spec.bits, uniforms[a:b]
                )
                bounds[2 * s], bounds[2 * s + 1] = low, high
            parts += [bounds.tobytes(), bitpack.pack_bits(codes, self.spec.bits)]
        elif name == SIGN:
            assert self.rotation is not None
            rotated = self.rotation.rotate(compressed)
            scales = np.empty(self.num_segments, "<f4")
            for s in range(self.num_segments):
                a, b = self.segment_starts[s], self.segment_starts[s + 1]
                scale = quantization.sign_scale(rotated[a:b])
                scales[s] = np.float32(scale / self.keep_probability)
            kept = rotated if self.kept is None else rotated[self.kept]
            parts += [scales.tobytes(), bitpack.pack_bits(quantization.sign_bits(kept), 1)]
        else:
            assert name == TOP_K
            offset = 0
            for a, b in self.compressed_ranges:
                n = b - a
                values = compressed[offset : offset + n]
                offset += n
                indices = quantization.top_k_indices(values, self._top_k(n))
                parts.append(bitpack.pack_bits(indices, _index_bits(n)))
                parts.append(values[indices].astype("<f4").tobytes())
        payload = b"".join(parts)
        assert len(payload) == self.payload_bytes
        return payload

    # ----- server half ---------------------------------------------------------------------

    def parse(self, payload: bytes) -> ParsedUpdate:
        """Checks a payload's structure. Raises CodecError naming what is wrong."""
        if len(payload) != self.payload_bytes:
            raise CodecError(
                f"encoded update is {len(payload)} bytes, this round's {self.spec.name} codec "
                f"expects {self.payload_bytes}"
            )
        raw = memoryview(payload)
        version, flags, pad0, pad1 = raw[:HEADER_BYTES]
        if version != FORMAT_VERSION:
            raise CodecError(f"encoded update format {version} is not {FORMAT_VERSION}")
        if flags & ~_ALL_FLAGS or pad0 or pad1:
            raise CodecError("encoded update header has unknown flags or nonzero padding")
        exact_bytes, scalar_bytes, stream_bytes = self._layout
        at = HEADER_BYTES
        exact = np.frombuffer(raw[at : at + exact_bytes], "<f4")
        at += exact_bytes
        scalars = np.frombuffer(raw[at : at + scalar_bytes], "<f4")
        at += scalar_bytes
        stream = raw[at : at + stream_bytes]
        name = self.spec.name
        codes, bits, count = None, 8, 0
        try:
            # Every code of a checked stream fits its width: no range to check.
            if name == UNIFORM and self.num_compressed:
                bits, count = self.spec.bits, self.num_compressed
                packed = bitpack.checked_stream(stream, bits, count)
            elif name == SIGN and self.num_compressed:
                bits, count = 1, self.domain_size
                packed = bitpack.checked_stream(stream, bits, count)
            elif name == TOP_K and self.num_compressed:
                codes, scalars = self._parse_top_k(stream)
                packed, count = _NO_STREAM, codes.size
            else:
                packed = _NO_STREAM
        except ValueError as exc:
            raise CodecError(f"corrupt {name} bit stream: {exc}") from exc
        return ParsedUpdate(UpdateFlags(flags), exact, scalars, packed, bits, count, codes)

    def _parse_top_k(self, stream: memoryview) -> tuple[np.ndarray, np.ndarray]:
        indices, values = [], []
        at = 0
        for a, b in self.compressed_ranges:
            n, k = b - a, self._top_k(b - a)
            size = bitpack.packed_size_bytes(k, _index_bits(n))
            idx = bitpack.unpack_bits(stream[at : at + size], _index_bits(n), k).astype(np.int64)
            at += size
            if idx.size and (idx.max() >= n or np.any(np.diff(idx) <= 0)):
                raise ValueError("top-k indices out of range or not strictly ascending")
            indices.append(idx)
            values.append(np.frombuffer(stream[at : at + 4 * k], "<f4"))
            at += 4 * k
        return np.concatenate(indices), np.concatenate(values)

    def decode_parsed(self, update: ParsedUpdate) -> np.ndarray:
        """The float32 update a parsed payload stands for."""
        accumulator = self.new_accumulator()
        accumulator.add(update, 1.0)
        return accumulator.weighted_sum()

    def new_accumulator(self) -> CodecAccumulator:
        return CodecAccumulator(self)

    def decode(self, payload: bytes) -> np.ndarray:
        """The float32 update a payload stands for (tests, golden vectors)."""
        return self.decode_parsed(self.parse(payload))


class CodecAccumulator:
    """Weighted sum of decoded updates, kept in the codec's domain. Memory O(model).

    `add` works through the update in pieces of at most `piece_size` values, each decoded into
    a reused scratch buffer that stays in the CPU's cache while it is added into the sum: no
    model-sized temporary, and the sum is read and written once. The arithmetic is the same
    per value as decoding the whole update first, so the sum does not depend on the pieces.
    """

    # Exact values (the float32 codec, and the tensors a codec leaves uncompressed) are summed
    # in float32 over blocks of this many updates, and each block's sum is added into the
    # float64 total, as the plain float32 mean does (server/aggregation.py). Adding float32
    # into float64 goes through numpy's casting loop, about 3x a float32 add; once per block
    # instead of once per update is what keeps the float32 codec within 3x a plain add
    # (benchmarks/compression_server_cost.py). A block's rounding is that of float32 over at
    # most this many terms: TFF sums every update in float32.
    updates_per_block = 16

    def __init__(self, codec: UpdateCodec, piece_size: int = 1 << 18) -> None:
        # 2**18 values: a float32 piece is 1 MiB, inside a server core's L2 cache; smaller
        # pieces pay more per-call overhead than they save (measured on a 2 MiB-L2 EPYC).
        self.codec = codec
        self._exact_total = np.zeros(codec.num_exact, np.float64)
        self._exact_block = np.zeros(codec.num_exact, np.float32)
        self._in_block = 0
        # float32: quantization error dwarfs float32 rounding of the sum, and it halves the
        # memory traffic of the hot loop.
        self.domain = np.zeros(codec.domain_size, np.float32)
        self.offsets = np.zeros(max(codec.num_segments, 0), np.float64)
        self._scratch = np.empty(max(1, min(codec.domain_size, piece_size)), np.float32)
        self._exact_scratch = np.empty(max(1, min(codec.num_exact, piece_size)), np.float32)

    @property
    def exact(self) -> np.ndarray:
        """The float64 sum of the exact values' weighted updates so far."""
        self._close_block()
        return self._exact_total

    def _close_block(self) -> None:
        if self._in_block:
            self._exact_total += self._exact_block
            self._exact_block.fill(0.0)
            self._in_block = 0

    def add(self, update: ParsedUpdate, weight: float) -> None:
        """Adds weight * decoded update. `update` must come from this codec's `parse`."""
        codec = self.codec
        if codec.num_exact:
            self._add_exact(update.exact, np.float32(weight))
        name = codec.spec.name
        if not codec.num_compressed or name == FLOAT32:
            return
        if name in (UNIFORM, SIGN):
            steps = np.empty(codec.num_segments, np.float32)
            for s in range(codec.num_segments):
                if name == UNIFORM:
                    low, high = update.scalars[2 * s], update.scalars[2 * s + 1]
                    self.offsets[s] += weight * float(low)
                    step = quantization.dequantize_step(low, high, codec.spec.bits)
                    steps[s] = np.float32(weight * step)
                else:
                    # scale * (1 - 2 * bit) = scale - 2 * scale * bit: the constant goes to
                    # offsets.
                    scale = weight * float(update.scalars[s])
                    self.offsets[s] += scale
                    steps[s] = np.float32(-2.0 * scale)
            self._add_scaled_codes(update, steps)
        else:
            assert name == TOP_K
            # Sparse: add the sent values at their coordinates (indices are distinct).
            offset, at = 0, 0
            for a, b in codec.compressed_ranges:
                k = codec._top_k(b - a)
                idx = offset + update.codes[at : at + k]
                self.domain[idx] += np.float32(weight) * update.scalars[at : at + k]
                offset += b - a
                at += k

    def _add_exact(self, exact: np.ndarray, weight: np.float32) -> None:
        # float32 products (as the codec's float32 weights), summed in float32 within a block
        # of updates and in float64 across blocks (updates_per_block).
        scratch, block = self._exact_scratch, self._exact_block
        for a in range(0, exact.size, scratch.size):
            b = min(a + scratch.size, exact.size)
            piece = scratch[: b - a]
            np.multiply(exact[a:b], weight, out=piece, dtype=np.float32)
            np.add(block[a:b], piece, out=block[a:b])
        self._in_block += 1
        if self._in_block == self.updates_per_block:
            self._close_block()

    def _add_scaled_codes(self, update: ParsedUpdate, steps: np.ndarray) -> None:
        """domain += codes * (the step of each code's segment), each product rounded to
        float32 first. Codes are unpacked a piece at a time, and each piece is added once
        whatever number of segments (rotation blocks) it spans."""
        starts, scratch = self.codec.domain_starts, self._scratch
        segment = 0
        for start in range(0, self.codec.domain_size, scratch.size):
            end = min(start + scratch.size, self.codec.domain_size)
            codes = update.code_range(start, end)
            while starts[segment + 1] <= start:
                segment += 1
            s = segment
            while s < len(steps) and starts[s] < end:
                a, b = max(int(starts[s]), start) - start, min(int(starts[s + 1]), end) - start
                np.multiply(codes[a:b], steps[s], out=scratch[a:b])
                s += 1
            piece = scratch[: end - start]
            np.add(self.domain[start:end], piece, out=self.domain[start:end])

    def merge(self, other: CodecAccumulator) -> None:
        a, b = self.codec, other.codec
        if (a.spec, a.tensor_sizes, a.seed) != (b.spec, b.tensor_sizes, b.seed):
            raise CodecError("cannot merge accumulators of different codecs")
        self.exact[...] += other.exact
        self.domain += other.domain
        self.offsets += other.offsets

    def weighted_sum(self) -> np.ndarray:
        """The sum of weight * update, as a float32 vector of the model's size."""
        codec = self.codec
        out = np.zeros(codec.num_parameters, np.float32)
        at = 0
        for a, b in codec.exact_ranges:
            out[a:b] = self.exact[at : at + b - a]
            at += b - a
        if not codec.num_compressed:
            return out
        domain = self.domain.astype(np.float64)
        if codec.spec.name in (UNIFORM, SIGN):
            lengths = np.diff(codec.domain_starts)
            domain += np.repeat(self.offsets, lengths)
        if codec.kept is not None:
            full = np.zeros(codec.num_compressed, np.float64)
            full[codec.kept] = domain
            domain = full
        if codec.rotation is not None:
            domain = codec.rotation.unrotate(domain)
        at = 0
        for a, b in codec.compressed_ranges:
            out[a:b] = domain[at : at + b - a]
            at += b - a
        return out
