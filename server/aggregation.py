"""Server halves of update aggregation, accumulated as updates arrive: memory O(model).

An `UpdateAggregator` is created per round. The coordinator calls `expected_payload_bytes`
when an upload's header arrives (before reading its payload), `accumulate` with the whole
payload, and `finalize` at commit. A refused update raises InvalidArgument and leaves the
aggregator exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from device_runtime import constants as protocol
from protos import common_pb2, device_pb2
from server.errors import InvalidArgument


class UpdateAggregator(Protocol):
    encoding: str

    @property
    def count(self) -> int:
        """Updates accumulated so far."""
        ...

    @property
    def total_weight(self) -> float: ...

    def expected_payload_bytes(self, header: device_pb2.UploadHeader) -> int:
        """Checks the header against this round's encoding. Raises InvalidArgument."""
        ...

    def accumulate(self, header: device_pb2.UploadHeader, payload: bytes | memoryview) -> None:
        """Decodes and adds one update. Raises InvalidArgument, changing nothing."""
        ...

    def finalize(self) -> tuple[np.ndarray, dict[str, float]]:
        """The aggregate (float32, model-sized) and this aggregator's measurements."""
        ...

    def client_spec(self) -> device_pb2.AggregationSpec:
        """The client half devices run this round (sent in the Assignment)."""
        ...


Buffer = bytes | memoryview


@runtime_checkable
class TakesChunks(Protocol):
    """An aggregator that decodes an update straight from the chunks it arrived in, saving
    the copy that joins them."""

    def accumulate_chunks(self, header: device_pb2.UploadHeader, chunks: Sequence[Buffer]) -> None:
        """As `accumulate(header, b"".join(chunks))`."""
        ...


def joined(parts: Sequence[Buffer]) -> Buffer:
    """The payload the chunks make up (copied once, unless it is one chunk)."""
    if len(parts) == 1:
        return parts[0]
    out = np.empty(sum(len(p) for p in parts), np.uint8)
    if len(out):
        np.concatenate([np.frombuffer(p, np.uint8) for p in parts], out=out)
    return out.data


def accumulate_received(
    aggregator: UpdateAggregator, header: device_pb2.UploadHeader, chunks: Sequence[Buffer]
) -> None:
    """Adds an update given as the chunks it was received in, to any aggregator."""
    if isinstance(aggregator, TakesChunks):
        aggregator.accumulate_chunks(header, chunks)
    else:
        aggregator.accumulate(header, joined(chunks))


class WeightedMeanAccumulator:
    """Sum of weight * update and of weights; partial accumulators merge (for sharding).

    Updates are scaled and summed in float32 (as TFF computes them) in a block of at most
    `flush_every` updates, and each block is added into a float64 total: the rounding error
    stays that of `flush_every` float32 additions however many updates arrive, while the
    per-update cost stays that of float32 adds (a float32 -> float64 add costs ~7x more).
    """

    flush_every = 16

    def __init__(self, num_parameters: int) -> None:
        self._total = np.zeros(num_parameters, np.float64)
        self._block = np.zeros(num_parameters, np.float32)
        self._block_count = 0
        self._scaled = np.empty(num_parameters, np.float32)  # reused: no per-update temporaries
        self.total_weight = 0.0
        self.count = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:
        if update.shape != self._total.shape:
            raise ValueError(f"update has shape {update.shape}, expected {self._total.shape}")
        self.accumulate_pieces([update], weight)

    def accumulate_pieces(self, pieces: Sequence[np.ndarray], weight: float) -> None:
        """Adds weight * the update the float32 pieces make up, in order.

        Each piece is scaled into its slice of a reused buffer and added there: no temporary
        and no joined copy. (BLAS axpy would be one pass instead of two, but its fused
        multiply-add rounds differently depending on alignment and length, and the sum
        should not depend on how an update was chunked.)
        """
        if sum(len(p) for p in pieces) != len(self._block):
            raise ValueError(f"update pieces do not add up to {len(self._block)} values")
        start, w = 0, np.float32(weight)
        for piece in pieces:
            end = start + len(piece)
            np.multiply(piece, w, out=self._scaled[start:end])
            np.add(self._block[start:end], self._scaled[start:end], out=self._block[start:end])
            start = end
        self._block_count += 1
        if self._block_count >= self.flush_every:
            self._flush()
        self.total_weight += weight
        self.count += 1

    def count_zero_weight(self) -> None:
        """Counts an update that adds nothing (weight 0), without a model-sized pass."""
        self.count += 1

    def _flush(self) -> None:
        if self._block_count:
            np.add(self._total, self._block, out=self._total)
            self._block.fill(0.0)
            self._block_count = 0

    def merge(self, other: WeightedMeanAccumulator) -> None:
        self._flush()
        other._flush()
        self._total += other._total
        self.total_weight += other.total_weight
        self.count += other.count

    def finalize(self) -> np.ndarray:
        """The weighted mean; zeros when no weight arrived (every update was zero-weighted)."""
        self._flush()
        if self.total_weight <= 0:
            return np.zeros(self._total.shape, np.float32)
        return (self._total / self.total_weight).astype(np.float32)


class Float32WeightedMean:
    """Plain FedAvg: float32 deltas, weighted by example count (TFF's weighted mean).

    As TFF's FedAvg does, an update with any non-finite value is zeroed and weighted 0: it is
    counted as a report (the device did its work) but cannot poison the model.
    """

    encoding = protocol.UPDATE_ENCODING_FLOAT32_DELTA

    def __init__(self, num_parameters: int) -> None:
        self._num_parameters = num_parameters
        self._mean = WeightedMeanAccumulator(num_parameters)
        self._num_nonfinite = 0

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_weight(self) -> float:
        return self._mean.total_weight

    def expected_payload_bytes(self, header: device_pb2.UploadHeader) -> int:
        if header.encoding != self.encoding:
            raise InvalidArgument(
                f"update encoding {header.encoding!r} is not this round's ({self.encoding!r})"
            )
        if header.num_elements != self._num_parameters:
            raise InvalidArgument(
                f"update has {header.num_elements} elements, the model has {self._num_parameters}"
            )
        if header.example_count <= 0:
            raise InvalidArgument(f"example_count must be positive, got {header.example_count}")
        return 4 * self._num_parameters

    def accumulate(self, header: device_pb2.UploadHeader, payload: bytes | memoryview) -> None:
        self.accumulate_chunks(header, [payload])

    def accumulate_chunks(self, header: device_pb2.UploadHeader, chunks: Sequence[Buffer]) -> None:
        expected = self.expected_payload_bytes(header)
        received = sum(len(c) for c in chunks)
        if received != expected:
            raise InvalidArgument(f"update payload is {received} bytes, expected {expected}")
        if any(len(c) % 4 for c in chunks):  # a value split across chunks: join them first
            chunks = [joined(chunks)]
        pieces = [np.frombuffer(c, "<f4") for c in chunks]
        # NaN or inf anywhere makes a dot product non-finite. (So does a value above ~1e19,
        # whose square overflows; such an update is zeroed too.)
        if np.isfinite(sum(float(np.dot(p, p)) for p in pieces)):
            self._mean.accumulate_pieces(pieces, float(header.example_count))
        else:
            self._mean.count_zero_weight()
            self._num_nonfinite += 1

    def client_spec(self) -> device_pb2.AggregationSpec:
        return device_pb2.AggregationSpec(encoding=self.encoding)

    def merge(self, other: Float32WeightedMean) -> None:
        """Adds another shard's partial aggregate of the same round into this one."""
        self._mean.merge(other._mean)
        self._num_nonfinite += other._num_nonfinite

    def finalize(self) -> tuple[np.ndarray, dict[str, float]]:
        return self._mean.finalize(), {
            "aggregator/num_reports": float(self._mean.count),
            "aggregator/total_weight": self._mean.total_weight,
            "aggregator/num_nonfinite_updates": float(self._num_nonfinite),
        }


class EvaluationReports:
    """Federated evaluation: reports carry metrics only; there is no update to aggregate."""

    encoding = protocol.REPORT_ENCODING_EVALUATION

    def __init__(self) -> None:
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return 0.0

    def expected_payload_bytes(self, header: device_pb2.UploadHeader) -> int:
        if header.encoding != self.encoding:
            raise InvalidArgument(
                f"report encoding {header.encoding!r} is not this round's ({self.encoding!r})"
            )
        if header.num_elements != 0:
            raise InvalidArgument("an evaluation report carries no update (num_elements 0)")
        if header.example_count <= 0:
            raise InvalidArgument(f"example_count must be positive, got {header.example_count}")
        return 0

    def accumulate(self, header: device_pb2.UploadHeader, payload: bytes | memoryview) -> None:
        self.expected_payload_bytes(header)
        if payload:
            raise InvalidArgument("an evaluation report carries no payload")
        self._count += 1

    def finalize(self) -> tuple[np.ndarray, dict[str, float]]:
        return np.zeros(0, np.float32), {"aggregator/num_reports": float(self._count)}

    def client_spec(self) -> device_pb2.AggregationSpec:
        return device_pb2.AggregationSpec(encoding=self.encoding)


class ClientMetricsAccumulator:
    """TFF's `client_work/train` metrics: example-weighted loss and accuracy, summed counts."""

    def __init__(self) -> None:
        self._loss_sum = 0.0
        self._correct = 0.0
        self.num_examples = 0
        self.num_batches = 0

    def accumulate(self, metrics: common_pb2.ClientMetrics) -> None:
        self._loss_sum += metrics.loss * metrics.num_examples
        self._correct += metrics.accuracy * metrics.num_examples
        self.num_examples += metrics.num_examples
        self.num_batches += metrics.num_batches

    def finalize(self, prefix: str = "client_work/train") -> dict[str, float]:
        n = max(self.num_examples, 1)
        return {
            f"{prefix}/loss": self._loss_sum / n,
            f"{prefix}/accuracy": self._correct / n,
            f"{prefix}/num_examples": float(self.num_examples),
            f"{prefix}/num_batches": float(self.num_batches),
        }
