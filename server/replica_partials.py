"""A replica's partial aggregate of one round, as bytes a leader can merge.

A replica accumulates the uploads it accepted into its own copy of the round's aggregator
(same aggregator, same shared seed and state as every other replica's: the leader recorded
them when it opened the round). When the round closes the replica hands its partial over
(server/replica_ledger.py); the leader rebuilds each partial into a fresh aggregator of the
round and adds it with the aggregator's own `merge`, the half that exists for sharding.

The format is numpy's .npz without pickles (a database row is data, never code): the
accumulator arrays of the aggregator plus its counters, the client metrics and the byte
counts. It is read only by replicas of the same version (a round never outlives a
deployment's upgrade: a restart abandons open rounds).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from device_runtime.aggregation.codec import UpdateFlags
from server.aggregation import (
    ClientMetricsAccumulator,
    EvaluationReports,
    Float32WeightedMean,
    UpdateAggregator,
)
from server.aggregators.round_aggregator import EncodedRoundAggregator


class PartialMismatch(ValueError):
    """A partial that does not fit the round's aggregator (another aggregator or model)."""


@dataclasses.dataclass
class RoundPartial:
    """What one replica received in one round."""

    aggregate: UpdateAggregator
    client_metrics: ClientMetricsAccumulator
    upload_bytes: int
    broadcast_bytes: int


def to_bytes(partial: RoundPartial) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    aggregate = partial.aggregate
    # The accumulators' internals are read here, in one place, rather than giving every
    # aggregator a serialization of its own for this one use.
    if isinstance(aggregate, Float32WeightedMean):
        mean = aggregate._mean
        mean._flush()
        arrays["total"] = mean._total
        scalars = [mean.total_weight, mean.count, aggregate._num_nonfinite]
    elif isinstance(aggregate, EncodedRoundAggregator):
        total = aggregate._sum
        arrays.update(exact=total.exact, domain=total.domain, offsets=total.offsets)
        arrays["flag_counts"] = np.array([aggregate._flag_counts[f] for f in UpdateFlags])
        arrays["enforced"] = np.array([aggregate._enforced[f] for f in aggregate._enforced])
        scalars = [aggregate.total_weight, aggregate.count, aggregate._nonfinite]
    elif isinstance(aggregate, EvaluationReports):
        scalars = [0.0, aggregate.count, 0]
    else:
        raise PartialMismatch(f"{type(aggregate).__name__} has no partial aggregate format")
    metrics = partial.client_metrics
    arrays["scalars"] = np.array(scalars, np.float64)
    arrays["client_metrics"] = np.array(
        [metrics._loss_sum, metrics._correct, metrics.num_examples, metrics.num_batches],
        np.float64,
    )
    arrays["bytes"] = np.array([partial.upload_bytes, partial.broadcast_bytes], np.int64)
    out = io.BytesIO()
    np.savez(out, allow_pickle=False, **arrays)
    return out.getvalue()


def merge_into(target: RoundPartial, data: bytes, blank: UpdateAggregator) -> None:
    """Adds the partial in `data` to `target`. `blank` is a fresh aggregator of the same round
    (same seed and state), which the partial is loaded into before the aggregator's own merge.
    Raises PartialMismatch, changing nothing, if the partial does not fit."""
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    weight, count, nonfinite = arrays["scalars"]
    aggregate = target.aggregate
    if isinstance(aggregate, Float32WeightedMean) and isinstance(blank, Float32WeightedMean):
        if arrays["total"].shape != blank._mean._total.shape:
            raise PartialMismatch("the partial's model size is not the round's")
        blank._mean._total[:] = arrays["total"]
        blank._mean.total_weight = float(weight)
        blank._mean.count = int(count)
        blank._num_nonfinite = int(nonfinite)
        aggregate.merge(blank)
    elif isinstance(aggregate, EncodedRoundAggregator) and isinstance(
        blank, EncodedRoundAggregator
    ):
        total = blank._sum
        for name in ("exact", "domain", "offsets"):
            if arrays[name].shape != getattr(total, name).shape:
                raise PartialMismatch("the partial's codec is not the round's")
            getattr(total, name)[:] = arrays[name]
        blank._flag_counts = dict(zip(UpdateFlags, map(int, arrays["flag_counts"]), strict=True))
        blank._enforced = dict(zip(blank._enforced, map(int, arrays["enforced"]), strict=True))
        blank.total_weight = float(weight)
        blank.count = int(count)
        blank._nonfinite = int(nonfinite)
        aggregate.merge(blank)
    elif isinstance(aggregate, EvaluationReports):
        aggregate._count += int(count)
    else:
        raise PartialMismatch(f"cannot merge a partial into {type(aggregate).__name__}")
    loss, correct, examples, batches = arrays["client_metrics"]
    metrics = target.client_metrics
    metrics._loss_sum += float(loss)
    metrics._correct += float(correct)
    metrics.num_examples += int(examples)
    metrics.num_batches += int(batches)
    upload, broadcast = arrays["bytes"]
    target.upload_bytes += int(upload)
    target.broadcast_bytes += int(broadcast)
