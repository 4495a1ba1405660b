"""How much an update counts: the example count the coordinator credits it with.

A device reports its own example count, and a weighted mean trusts it: one device claiming
2^62 examples would own the round. The coordinator credits at most the count the device
declared at check-in (when it was selected for it), at most the task's
`max_examples_per_device`, and at most the plan's `max_examples`.
"""

from __future__ import annotations

import math

from protos import device_pb2
from server.config import TaskConfig
from server.errors import InvalidArgument
from server.rounds.round import DeviceAssignment


def credited_header(
    header: device_pb2.UploadHeader, config: TaskConfig, assignment: DeviceAssignment
) -> device_pb2.UploadHeader:
    """The header with the example count the coordinator credits (its weight in the mean):
    at most what the device declared at check-in and at most the task's per-device maximum
    (and its plan's `max_examples`). Client metrics are capped to match. Raises
    InvalidArgument for metrics no device can produce."""
    metrics = header.metrics
    if not (math.isfinite(metrics.loss) and 0.0 <= metrics.accuracy <= 1.0):
        raise InvalidArgument("client metrics need a finite loss and an accuracy in [0, 1]")
    if metrics.num_examples < 0 or metrics.num_batches < 0:
        raise InvalidArgument("client metrics counts must be >= 0")
    credit = min(
        header.example_count,
        assignment.declared_examples,
        config.max_examples_per_device,
        config.max_examples or config.max_examples_per_device,
    )
    processed = max(credit, 0) * max(config.epochs, 1)  # examples over every epoch
    if (
        credit == header.example_count
        and max(metrics.num_examples, metrics.num_batches) <= processed
    ):
        return header
    credited = device_pb2.UploadHeader()
    credited.CopyFrom(header)
    credited.example_count = credit
    credited.metrics.num_examples = min(metrics.num_examples, processed)
    credited.metrics.num_batches = min(metrics.num_batches, processed)
    return credited
