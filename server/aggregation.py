"""Weighted FedAvg aggregation, accumulated as updates arrive: memory O(model), not O(clients)."""

from __future__ import annotations

import numpy as np

from protos import common_pb2


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
        if self.total_weight <= 0:
            raise ValueError("no weight accumulated")
        return (self._weighted_sum / self.total_weight).astype(np.float32)


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

    def finalize(self) -> dict[str, float]:
        n = max(self.num_examples, 1)
        return {
            "client_work/train/loss": self._loss_sum / n,
            "client_work/train/accuracy": self._correct / n,
            "client_work/train/num_examples": float(self.num_examples),
            "client_work/train/num_batches": float(self.num_batches),
        }
