"""What a device selected for a round is handed: an upload token (kept only as its hash),
the resources to fetch, the plan and the time it has to report."""

from __future__ import annotations

import hashlib

from protos import common_pb2, device_pb2
from server.rounds.round import RoundInProgress
from server.store import RoundState
from server.task_runtime import TaskRuntime


def token_digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


def dropout_seed(token: bytes) -> int:
    """The seed of an assignment's dropout masks: as unique as its random upload token, so
    devices and rounds never share masks (never 0, which means "unset" on the wire)."""
    seed = int.from_bytes(hashlib.sha256(b"overnight/dropout-seed/" + token).digest()[:8], "little")
    return seed or 1


def assignment_message(
    task: TaskRuntime, round_: RoundInProgress, token: bytes, now: float
) -> device_pb2.Assignment:
    deadline = (
        round_.reporting_deadline
        if round_.state is RoundState.REPORTING
        else round_.started_at + task.config.selection_deadline_s + task.config.reporting_deadline_s
    )
    plan = task.config.plan()
    plan.dropout_seed = dropout_seed(token)
    return device_pb2.Assignment(
        task_id=task.task_id,
        round_number=round_.round_number,
        upload_token=token,
        model=common_pb2.ResourceRef(sha256=task.record.model_sha256, kind="model"),
        weights=common_pb2.ResourceRef(
            sha256=round_.base_weights_sha256,
            size_bytes=4 * task.record.num_parameters,
            kind="weights",
        ),
        plan=plan,
        report_deadline_s=max(0.0, deadline - now),
        kind=(
            device_pb2.Assignment.EVALUATION
            if task.config.is_evaluation
            else device_pb2.Assignment.TRAINING
        ),
        aggregation=round_.aggregate.client_spec(),
    )
