"""The client half of an aggregator: what a device does to its update before uploading it.

Order, as TFF's compression_aggregator composes it (zeroing(clipping(mean(codec)))):
1. an update with NaN or infinity is sent as all-NaN, which the server counts and weights 0;
2. zeroing: if its norm exceeds the zeroing bound, the update is replaced by zeros;
3. clipping: if its L2 norm exceeds the clipping bound, it is scaled onto the bound
   (differential privacy uses this clipping too; its noise is added by the server);
4. the codec encodes it. Adaptive bounds also get the device's vote (norm <= estimate).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from device_runtime import constants
from device_runtime.aggregation.codec import UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecError, CodecSpec
from device_runtime.aggregation.norms import clip_l2, global_norm
from protos import device_pb2


@dataclasses.dataclass(frozen=True)
class NormBound:
    bound: float
    norm_order: float = 2.0
    estimate: float = 0.0  # > 0: adaptive; the device votes whether its norm <= estimate

    def to_proto(self) -> device_pb2.NormBound:
        return device_pb2.NormBound(
            bound=self.bound, norm_order=self.norm_order, estimate=self.estimate
        )

    @classmethod
    def from_proto(cls, message: device_pb2.NormBound) -> NormBound:
        bound = cls(message.bound, message.norm_order or 2.0, message.estimate)
        if not (bound.bound >= 0 and math.isfinite(bound.bound)):
            raise CodecError(f"norm bound must be a finite number >= 0, got {bound.bound}")
        if not (bound.norm_order in (1.0, 2.0) or math.isinf(bound.norm_order)):
            raise CodecError(f"norm order must be 1, 2 or inf, got {bound.norm_order}")
        return bound


@dataclasses.dataclass(frozen=True)
class ClientAggregationSpec:
    codec: CodecSpec
    seed: int
    tensor_sizes: tuple[int, ...]
    zeroing: NormBound | None = None
    clipping: NormBound | None = None

    def to_proto(self) -> device_pb2.AggregationSpec:
        c = self.codec
        return device_pb2.AggregationSpec(
            encoding=constants.UPDATE_ENCODING_V1,
            seed=self.seed,
            tensor_sizes=list(self.tensor_sizes),
            zeroing=self.zeroing.to_proto() if self.zeroing else None,
            clipping=self.clipping.to_proto() if self.clipping else None,
            codec=device_pb2.CodecParams(
                name=c.name,
                bits=c.bits,
                threshold=c.threshold,
                rotation=c.rotation,
                keep_fraction=c.keep_fraction,
                top_k_fraction=c.top_k_fraction,
                max_block_size=c.max_block_size,
            ),
        )

    @classmethod
    def from_proto(cls, message: device_pb2.AggregationSpec) -> ClientAggregationSpec:
        """Raises CodecError if the spec is not one this runtime can follow."""
        if message.encoding != constants.UPDATE_ENCODING_V1:
            raise CodecError(f"unsupported update encoding {message.encoding!r}")
        p = message.codec
        codec = CodecSpec(
            name=p.name,
            bits=p.bits,
            threshold=p.threshold,
            rotation=p.rotation,
            keep_fraction=p.keep_fraction,
            top_k_fraction=p.top_k_fraction,
            max_block_size=p.max_block_size,
        ).validate()
        return cls(
            codec=codec,
            seed=message.seed,
            tensor_sizes=tuple(message.tensor_sizes),
            zeroing=NormBound.from_proto(message.zeroing) if message.HasField("zeroing") else None,
            clipping=(
                NormBound.from_proto(message.clipping) if message.HasField("clipping") else None
            ),
        )

    def codec_for_round(self) -> UpdateCodec:
        return UpdateCodec(self.codec, self.tensor_sizes, self.seed)


def prepare_update(
    spec: ClientAggregationSpec, delta: np.ndarray
) -> tuple[np.ndarray, UpdateFlags]:
    """Steps 1-3: the update to encode and the flags that tell the server what happened."""
    flags = UpdateFlags(0)
    if not np.all(np.isfinite(delta)):
        return np.full(delta.shape, np.nan, np.float32), flags
    update = delta.astype(np.float32)
    if spec.zeroing is not None:
        norm = global_norm(update, spec.zeroing.norm_order)
        if spec.zeroing.estimate > 0 and norm <= spec.zeroing.estimate:
            flags |= UpdateFlags.BELOW_ZEROING_ESTIMATE
        if norm > spec.zeroing.bound:
            update = np.zeros_like(update)
            flags |= UpdateFlags.ZEROED
    if spec.clipping is not None:
        norm = global_norm(update, 2.0)
        if spec.clipping.estimate > 0 and norm <= spec.clipping.estimate:
            flags |= UpdateFlags.BELOW_CLIPPING_ESTIMATE
        update, clipped = clip_l2(update, spec.clipping.bound)
        if clipped:
            flags |= UpdateFlags.CLIPPED
    return update, flags


def encode_update(
    spec: ClientAggregationSpec, delta: np.ndarray, rng: np.random.Generator
) -> bytes:
    """The payload of an "overnight_encoded_v1" upload. Raises CodecError on a size mismatch."""
    codec = spec.codec_for_round()
    if delta.shape != (codec.num_parameters,):
        raise CodecError(
            f"update has {delta.size} values but the round's aggregation spec describes "
            f"{codec.num_parameters}"
        )
    update, flags = prepare_update(spec, delta)
    return codec.encode(update, flags, codec.uniform_draws(rng))


@dataclasses.dataclass(frozen=True)
class EncodedUpload:
    """What the transport sends: payload bytes, their encoding and the parameters they stand for."""

    payload: bytes
    encoding: str
    num_elements: int


def encode_for_upload(
    spec: device_pb2.AggregationSpec, delta: np.ndarray, rng: np.random.Generator
) -> EncodedUpload:
    """Runs the assignment's client half over a trained delta. Raises CodecError.

    An assignment without a spec (or with "float32_delta") uploads the raw float32 delta.
    """
    if spec.encoding in ("", constants.UPDATE_ENCODING_FLOAT32_DELTA):
        payload = np.ascontiguousarray(delta, dtype="<f4").tobytes()
        return EncodedUpload(payload, constants.UPDATE_ENCODING_FLOAT32_DELTA, int(delta.size))
    client_spec = ClientAggregationSpec.from_proto(spec)
    payload = encode_update(client_spec, delta, rng)
    return EncodedUpload(payload, constants.UPDATE_ENCODING_V1, int(delta.size))
