"""An operator pauses, resumes and cancels tasks: what devices see, and what a restart keeps."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator
from server.errors import FailedPrecondition, NotFound
from server.sqlite_store import SqliteStore
from server.store import RoundState, TaskState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import check_in, make_coordinator, sign_header


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "store.sqlite"


def _coordinator(
    store_path: pathlib.Path, clock: FakeClock, model_bytes: bytes | None = None, **config: object
) -> Coordinator:
    coordinator = make_coordinator(SqliteStore(store_path), clock)
    if model_bytes is not None:
        coordinator.register_task(task_config(**config), model_bytes)
    return coordinator


def _check_in(coordinator: Coordinator, device_id: str) -> device_pb2.CheckInResponse:
    return check_in(coordinator, device_id)


def _upload(coordinator: Coordinator, token: bytes) -> None:
    n = coordinator.task("t1").record.num_parameters
    payload = np.zeros(n, "<f4").tobytes()
    header = device_pb2.UploadHeader(
        protocol_version=constants.PROTOCOL_VERSION,
        upload_token=token,
        example_count=10,
        num_elements=n,
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=10, num_batches=2),
    )
    sign_header(header)
    coordinator.accept_upload(header, payload, len(payload))
    coordinator.tick()  # the round driver ends the round if this report completed it


def test_a_paused_task_turns_devices_away_with_a_retry_window(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)

    coordinator.control_task("t1", TaskState.PAUSED)
    answer = _check_in(coordinator, "d1")

    assert answer.rejection.reason == device_pb2.Rejection.NO_TASK
    assert "paused" in answer.rejection.message
    window = coordinator.settings.paused_task_retry_s
    assert (answer.retry_window.min_delay_s, answer.retry_window.max_delay_s) == window
    assert coordinator.task("t1").status == "paused"


def test_a_paused_tasks_open_round_still_takes_reports_and_commits(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=1)
    token = _check_in(coordinator, "d1").assignment.upload_token
    coordinator.control_task("t1", TaskState.PAUSED)

    _upload(coordinator, token)

    rounds = coordinator.rounds("t1")
    assert [r.state for r in rounds] == [RoundState.COMMITTED]
    assert _check_in(coordinator, "d2").rejection.reason == device_pb2.Rejection.NO_TASK


def test_a_resumed_task_assigns_devices_again(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)
    coordinator.control_task("t1", TaskState.PAUSED)

    coordinator.control_task("t1", TaskState.RUNNING)

    assert _check_in(coordinator, "d1").HasField("assignment")
    assert coordinator.task("t1").status == "running"


def test_cancelling_abandons_open_rounds_and_refuses_their_uploads(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)
    token = _check_in(coordinator, "d1").assignment.upload_token

    coordinator.control_task("t1", TaskState.CANCELLED)

    assert [r.state for r in coordinator.rounds("t1")] == [RoundState.ABANDONED]
    with pytest.raises(FailedPrecondition, match="abandoned"):
        _upload(coordinator, token)
    assert _check_in(coordinator, "d2").rejection.reason == device_pb2.Rejection.NO_TASK


@pytest.mark.parametrize("decision", [TaskState.PAUSED, TaskState.CANCELLED])
def test_a_restarted_coordinator_keeps_the_operators_decision(
    store_path, clock, model_bytes, decision
) -> None:
    first = _coordinator(store_path, clock, model_bytes)
    first.control_task("t1", decision)

    restarted = _coordinator(store_path, clock)

    assert restarted.task("t1").state is decision
    assert _check_in(restarted, "d1").rejection.reason == device_pb2.Rejection.NO_TASK


@pytest.mark.parametrize("target", [TaskState.PAUSED, TaskState.RUNNING])
def test_a_cancelled_task_stays_cancelled(store_path, clock, model_bytes, target) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)
    coordinator.control_task("t1", TaskState.CANCELLED)

    with pytest.raises(FailedPrecondition, match="cancelled"):
        coordinator.control_task("t1", target)
    assert coordinator.task("t1").status == "cancelled"


def test_a_completed_task_cannot_be_cancelled(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, total_rounds=1, target_reports=1)
    _upload(coordinator, _check_in(coordinator, "d1").assignment.upload_token)

    with pytest.raises(FailedPrecondition, match="completed"):
        coordinator.control_task("t1", TaskState.CANCELLED)


def test_asking_for_the_current_state_changes_nothing(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)
    _check_in(coordinator, "d1")
    coordinator.control_task("t1", TaskState.PAUSED)

    task = coordinator.control_task("t1", TaskState.PAUSED)

    assert task.state is TaskState.PAUSED
    assert [r.state for r in task.open_rounds.values()] == [RoundState.SELECTING]


def test_an_unknown_task_is_not_found(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)

    with pytest.raises(NotFound):
        coordinator.control_task("nope", TaskState.PAUSED)
