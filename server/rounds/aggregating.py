"""AGGREGATING: the round takes no more reports; its aggregate becomes the next global model."""

from __future__ import annotations

import dataclasses

import numpy as np

from server.optimizers import ServerOptimizer, State
from server.rounds.round import RoundInProgress


@dataclasses.dataclass(frozen=True)
class Aggregate:
    weights: np.ndarray
    optimizer_state: State
    metrics: dict[str, float]


def evaluated(round_: RoundInProgress, evaluated_weights: bytes) -> Aggregate:
    """A federated evaluation round: the model is unchanged; the reports are the result."""
    metrics = round_.client_metrics.finalize(prefix="federated_eval")
    metrics["aggregator/num_reports"] = float(round_.aggregate.count)
    weights = np.frombuffer(evaluated_weights, "<f4").astype(np.float32)
    return Aggregate(weights, {}, metrics)


def aggregate(
    round_: RoundInProgress,
    weights: np.ndarray,
    optimizer: ServerOptimizer,
    optimizer_state: State,
    committed_rounds: int,
) -> Aggregate:
    """Applies the round's mean update to `weights` (the current global model) with the
    server optimizer. A non-finite aggregate is rejected (weights and state unchanged), as
    TFF's apply-optimizer finalizer does.
    """
    mean_delta, aggregator_metrics = round_.aggregate.finalize()
    metrics = round_.client_metrics.finalize()
    metrics.update(aggregator_metrics)
    metrics["round/staleness"] = float(committed_rounds - round_.base_version)
    if not np.all(np.isfinite(mean_delta)):
        metrics["finalizer/update_non_finite"] = 1.0
        return Aggregate(weights, optimizer_state, metrics)
    new_state, new_weights = optimizer.apply(optimizer_state, weights, mean_delta)
    if not np.all(np.isfinite(new_weights)):
        metrics["finalizer/update_non_finite"] = 1.0
        return Aggregate(weights, optimizer_state, metrics)
    metrics["finalizer/update_non_finite"] = 0.0
    return Aggregate(new_weights.astype(np.float32), new_state, metrics)


def is_finite(result: Aggregate) -> bool:
    """Whether the new weights and every optimizer state value are finite. (A state value
    can overflow while the weights stay finite, e.g. Adam's preconditioner from a huge
    update, and would then stall or poison every later round.)"""
    return bool(np.all(np.isfinite(result.weights))) and all(
        bool(np.all(np.isfinite(value))) for value in result.optimizer_state.values()
    )
