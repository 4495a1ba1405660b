"""What an operator's new task must satisfy before it is stored: its config, its model and
initial weights, or (for an evaluation task) the training task it evaluates."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device_runtime.clock import Clock
from device_runtime.manifest import ManifestError
from device_runtime.model_file import read_manifest
from device_runtime.secagg.parameters import fewest_clients
from server.aggregators.presets import parse_aggregator
from server.config import TaskConfig
from server.errors import AlreadyExists, InvalidArgument
from server.store import Store, TaskRecord
from server.task_runtime import TaskRuntime


def new_task_record(
    config: TaskConfig,
    model_bytes: bytes,
    initial_weights: bytes | None,
    tasks: Mapping[str, TaskRuntime],
    store: Store,
    clock: Clock,
) -> TaskRecord:
    """The record of a valid new task; its model and weights are stored as resources.
    Raises InvalidArgument or AlreadyExists, storing nothing."""
    config.validate()
    if config.task_id in tasks:
        raise AlreadyExists(f"task {config.task_id!r} already exists")
    fewest = fewest_clients()
    if parse_aggregator(config.aggregator).secure and config.selection_quota < fewest:
        raise InvalidArgument(
            f"task config fields 'target_reports' x 'over_selection' select "
            f"{config.selection_quota} devices, but secure_aggregator() needs at least "
            f"{fewest}: raise target_reports or over_selection"
        )
    if config.is_evaluation:
        return _evaluation_record(config, tasks.get(config.evaluates), clock.now())
    try:
        manifest = read_manifest(model_bytes)
    except ManifestError as exc:
        raise InvalidArgument(f"model rejected: {exc}") from exc
    if manifest.batch_size != config.batch_size:
        raise InvalidArgument(
            f"task config field 'batch_size' is {config.batch_size} but the model was "
            f"exported with batch size {manifest.batch_size}"
        )
    if config.fedprox_mu > 0 and not manifest.fedprox:
        raise InvalidArgument(
            f"task config field 'fedprox_mu' is {config.fedprox_mu} but the model was "
            "exported without FedProx; export it with `overnight export --fedprox`"
        )
    if initial_weights is None or len(initial_weights) == 0:
        from device_runtime.model_runner import TrainableModel

        initial_weights = TrainableModel(model_bytes).get_weights().astype("<f4").tobytes()
    weights = np.frombuffer(initial_weights, "<f4") if len(initial_weights) % 4 == 0 else None
    if weights is None or weights.size != manifest.num_parameters:
        raise InvalidArgument(
            f"initial weights must be {manifest.num_parameters} float32 values "
            f"({4 * manifest.num_parameters} bytes), got {len(initial_weights)} bytes"
        )
    if not np.all(np.isfinite(weights)):
        raise InvalidArgument("initial weights contain NaN or infinity")
    return TaskRecord(
        config=config,
        model_sha256=store.put_resource("model", model_bytes),
        initial_weights_sha256=store.put_resource("weights", initial_weights),
        num_parameters=manifest.num_parameters,
        created_at=clock.now(),
    )


def _evaluation_record(config: TaskConfig, target: TaskRuntime | None, now: float) -> TaskRecord:
    """An evaluation task shares its training task's model and starts from its latest weights."""
    if target is None or target.config.is_evaluation:
        raise InvalidArgument(
            f"task config field 'evaluates': {config.evaluates!r} is not a training task"
        )
    if config.batch_size != target.config.batch_size:
        raise InvalidArgument(
            f"task config field 'batch_size' is {config.batch_size} but task "
            f"{target.task_id!r} uses {target.config.batch_size}"
        )
    return TaskRecord(
        config=config,
        model_sha256=target.record.model_sha256,
        initial_weights_sha256=target.weights_sha256,
        num_parameters=target.record.num_parameters,
        created_at=now,
    )
