"""Server halves of update aggregation, accumulated as updates arrive: memory O(model).

An `UpdateAggregator` is created per round. The coordinator calls `expected_payload_bytes`
when an upload's header arrives (before reading its payload), `accumulate` with the whole
payload, and `finalize` at commit. A refused update raises InvalidArgument and leaves the
aggregator exactly as it was.
"""

from __future__ import annotations

from typing import Protocol

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


class WeightedMeanAccumulator:
    """Sum of weight * update and of weights; partial accumulators merge (for sharding)."""

    def __init__(self, num_parameters: int) -> None:
        # float64: summing thousands of float32 updates loses no precision to the order.
        self._weighted_sum = np.zeros(num_parameters, np.float64)
        self.total_weight = 0.0
        self.count = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:
        if update.shape != self._weighted_sum.shape:
            raise ValueError(
                f"update has shape {update.shape}, expected {self._weighted_sum.shape}"
            )
        self._weighted_sum += weight * update.astype(np.float64)
        self.total_weight += weight
        self.count += 1

    def merge(self, other: WeightedMeanAccumulator) -> None:
        self._weighted_sum += other._weighted_sum
        self.total_weight += other.total_weight
        self.count += other.count

    def finalize(self) -> np.ndarray:
        """The weighted mean; zeros when no weight arrived (every update was zero-weighted)."""
        if self.total_weight <= 0:
            return np.zeros(self._weighted_sum.shape, np.float32)
        return (self._weighted_sum / self.total_weight).astype(np.float32)


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
        expected = self.expected_payload_bytes(header)
        if len(payload) != expected:
            raise InvalidArgument(f"update payload is {len(payload)} bytes, expected {expected}")
        delta = np.frombuffer(payload, "<f4")
        if np.all(np.isfinite(delta)):
            self._mean.accumulate(delta, float(header.example_count))
        else:
            self._mean.accumulate(np.zeros_like(delta), 0.0)
            self._num_nonfinite += 1

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
