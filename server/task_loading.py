"""A task read back from the store, as a coordinator starts (or a replica takes its lease):
the latest committed model and optimizer state, and the rounds a dead process left open
recorded as abandoned, since their updates died with it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from device_runtime.logs import about
from server.aggregators.process import AggregationProcess
from server.leases import Lease
from server.optimizers import deserialize_state
from server.rounds import closed
from server.store import RoundState, Store, TaskRecord
from server.task_runtime import TaskRuntime, recent_outcomes_kept

log = logging.getLogger(__name__)


def load_task(store: Store, record: TaskRecord, resource: Callable[[str], bytes]) -> TaskRuntime:
    """The task as its committed rounds left it. `resource` reads a stored resource or
    raises NotFound."""
    task_id = record.config.task_id
    rounds = store.rounds(task_id)
    committed = [r for r in rounds if r.state is RoundState.COMMITTED]
    weights_sha = committed[-1].weights_sha256 if committed else record.initial_weights_sha256
    weights_bytes = store.get_resource(weights_sha)
    if weights_bytes is None:
        raise RuntimeError(f"store lacks weights {weights_sha} of task {task_id}")
    optimizer = record.config.optimizer()
    state_bytes = store.server_state(task_id) if committed else b""
    last_metrics = committed[-1].metrics if committed else {}
    runtime = TaskRuntime(
        record=record,
        weights=np.frombuffer(weights_bytes, "<f4").astype(np.float32),
        weights_sha256=weights_sha,
        optimizer=optimizer,
        optimizer_state=(
            deserialize_state(state_bytes)
            if state_bytes
            else optimizer.initialize(record.num_parameters)
        ),
        committed_rounds=len(committed),
        next_round_number=(rounds[-1].round_number + 1) if rounds else 1,
        aggregation=AggregationProcess.for_task(
            record.config.aggregator, resource(record.model_sha256), last_metrics
        ),
        broadcasted_bits=last_metrics.get("broadcasted_bits", 0.0),
        aggregated_bits=last_metrics.get("aggregated_bits", 0.0),
        state=record.state,
    )
    for closed_round in rounds[-recent_outcomes_kept:]:
        runtime.remember_outcome(closed_round.round_number, closed_round.state)
    return runtime


def abandon_lost_rounds(store: Store, now: float, task_id: str, fence: Lease | None) -> None:
    """Records the rounds that were open when a previous process died: their updates are gone."""
    for lost in store.unrecorded_rounds(task_id):
        store.record_closed_round(closed.abandoned(task_id, lost, now), fence)
        log.warning(
            "task %s: round %d abandoned by a coordinator restart (%d devices selected)",
            task_id,
            lost.round_number,
            lost.selected,
            extra=about(task_id, lost.round_number),
        )
