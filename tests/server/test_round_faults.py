"""Faults short of a crash: a store on a full disk, a task whose logic raises, a restart
with rounds open. The full disk is real: a small tmpfs filled to its last byte."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib

import grpc
import numpy as np
import pytest

from device_runtime import constants
from device_runtime.transport import CoordinatorClient, TransportError
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator, CoordinatorSettings
from server.errors import StoreUnavailable
from server.sqlite_store import SqliteStore
from server.store import RoundState, Store
from tests.fakes import FakeClock
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET, check_in, make_coordinator, sign_header
from tests.small_disk import SmallDisk


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _check_in(
    coordinator: Coordinator, device_id: str, population: str = POPULATION
) -> device_pb2.CheckInResponse:
    return check_in(coordinator, device_id, population=population)


def _upload(coordinator: Coordinator, token: bytes, values: np.ndarray) -> None:
    payload = values.astype("<f4").tobytes()
    header = device_pb2.UploadHeader(
        protocol_version=constants.PROTOCOL_VERSION,
        upload_token=token,
        example_count=10,
        num_elements=values.size,
        encoding="float32_delta",
        metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=10, num_batches=2),
    )
    sign_header(header)
    coordinator.accept_upload(header, payload, len(payload))


def _reported_round(coordinator: Coordinator, n_params: int, devices: int = 2) -> list[bytes]:
    tokens = [_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(devices)]
    for token in tokens:
        _upload(coordinator, token, np.full(n_params, 0.25, np.float32))
    return tokens


def test_a_failed_commit_is_retried_and_counts_each_upload_once(
    small_disk: SmallDisk, clock: FakeClock, model_bytes: bytes, caplog
) -> None:
    store = SqliteStore(small_disk.path / "store.sqlite")
    coordinator = make_coordinator(store, clock)
    coordinator.register_task(task_config(target_reports=2, over_selection=1.0), model_bytes)

    commit_on_a_full_disk_is_retried(
        coordinator, store, clock, small_disk, caplog, "database or disk is full"
    )


def commit_on_a_full_disk_is_retried(
    coordinator: Coordinator,
    store: Store,
    clock: FakeClock,
    disk: SmallDisk,
    caplog: pytest.LogCaptureFixture,
    cause: str,
) -> None:
    """A round of task t1 (2 reports) whose commit meets a full disk: nothing changes, the
    cause is logged, and once the disk has room and the backoff passed, the round commits
    with each upload counted once and the task goes on. For every store (PostgreSQL's:
    tests/server/test_postgres_disk_full.py)."""
    task = coordinator.task("t1")
    before = task.weights.copy()
    _reported_round(coordinator, before.size)

    with disk.filled(), caplog.at_level(logging.ERROR):
        coordinator.tick()

    assert cause in caplog.text, caplog.text
    assert "rollback" not in caplog.text.lower()  # the real cause, not the failed ROLLBACK
    assert task.current is not None and task.current.state is RoundState.AGGREGATING
    assert task.committed_rounds == 0 and store.rounds("t1") == []
    np.testing.assert_array_equal(task.weights, before)

    clock.advance(60)  # past the retry backoff; the disk has room again
    coordinator.tick()

    [record] = store.rounds("t1")
    assert (record.state, record.reported) == (RoundState.COMMITTED, 2)
    assert task.committed_rounds == 1
    np.testing.assert_allclose(task.weights, before + 0.25, atol=1e-6)
    assert _check_in(coordinator, "d9").HasField("assignment")  # the task goes on


def test_a_failed_commit_is_not_retried_before_its_backoff(
    small_disk: SmallDisk, clock: FakeClock, model_bytes: bytes
) -> None:
    store = SqliteStore(small_disk.path / "store.sqlite")
    coordinator = make_coordinator(store, clock)
    coordinator.register_task(task_config(target_reports=2, over_selection=1.0), model_bytes)
    _reported_round(coordinator, coordinator.task("t1").record.num_parameters)
    with small_disk.filled():
        coordinator.tick()

    coordinator.tick()  # the disk has room, but the backoff has not passed

    assert store.rounds("t1") == []


def test_a_store_failure_at_check_in_is_unavailable_with_a_retry_window(
    small_disk: SmallDisk, clock: FakeClock, model_bytes: bytes
) -> None:
    store = SqliteStore(small_disk.path / "store.sqlite")
    coordinator = make_coordinator(store, clock)
    coordinator.register_task(task_config(), model_bytes)
    with small_disk.filled(), pytest.raises(StoreUnavailable, match="disk is full") as refused:
        _check_in(coordinator, "d1")

    low, high = coordinator.settings.store_unavailable_retry_s
    assert low <= refused.value.retry_after_s <= high
    assert coordinator.task("t1").current is None or coordinator.task("t1").current.selected == 0
    assert _check_in(coordinator, "d1").HasField("assignment")  # nothing was half-done


def _break(coordinator: Coordinator, task_id: str) -> None:
    """Gives a registered task a config no validation would pass (over_selection = inf, as
    an older release accepted it): selecting for it raises OverflowError. Stands in for any
    defect in one task's round logic."""
    task = coordinator.task(task_id)
    broken = dataclasses.replace(task.config, over_selection=float("inf"))
    task.record = dataclasses.replace(task.record, config=broken)


def test_a_task_whose_logic_raises_fails_alone(
    tmp_path: pathlib.Path, clock: FakeClock, model_bytes: bytes
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    coordinator = make_coordinator(store, clock)
    coordinator.register_task(task_config(task_id="broken"), model_bytes)
    coordinator.register_task(task_config(task_id="spare", population="spare"), model_bytes)
    coordinator.register_task(
        task_config(task_id="healthy", target_reports=1, over_selection=1.0), model_bytes
    )
    _break(coordinator, "broken")

    answer = _check_in(coordinator, "d1")

    assert answer.assignment.task_id == "healthy"
    assert "OverflowError" in coordinator.task("broken").fault
    assert coordinator.task("broken").status.startswith("failed: OverflowError")
    _upload(
        coordinator,
        answer.assignment.upload_token,
        np.zeros(answer.assignment.weights.size_bytes // 4, np.float32),
    )
    coordinator.tick()
    assert [r.state for r in store.rounds("healthy")] == [RoundState.COMMITTED]
    assert _check_in(coordinator, "d2", population="spare").HasField("assignment")


def test_a_restart_records_open_rounds_abandoned_with_their_true_counts(
    tmp_path: pathlib.Path, clock: FakeClock, model_bytes: bytes
) -> None:
    path = tmp_path / "store.sqlite"
    coordinator = make_coordinator(SqliteStore(path), clock)
    coordinator.register_task(task_config(target_reports=3, over_selection=1.0), model_bytes)
    for i in range(3):
        _check_in(coordinator, f"d{i}")
    started = clock.now()
    clock.advance(5)

    restarted = make_coordinator(SqliteStore(path), clock)

    [record] = restarted.rounds("t1")
    assert record.state is RoundState.ABANDONED
    assert (record.selected, record.reported, record.dropped) == (3, 0, 3)
    assert record.started_at == started and record.finished_at == clock.now()


def test_a_store_failure_reaches_a_device_as_unavailable_with_retry_after(
    small_disk: SmallDisk, model_bytes: bytes
) -> None:
    async def scenario() -> TransportError:
        async with running_coordinator(
            str(small_disk.path / "store.sqlite"), model_bytes, task_config()
        ) as running:
            client = CoordinatorClient(running.address, running.trust)
            await client.enroll(POPULATION, ENROLLMENT_SECRET)
            try:
                with small_disk.filled():
                    try:
                        await client.check_in(POPULATION, 10)
                    except TransportError as exc:
                        return exc
                raise AssertionError("a check-in on a full disk was served")
            finally:
                await client.close()

    refused = asyncio.run(scenario())

    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert "database or disk is full" in refused.details
    low, high = CoordinatorSettings().store_unavailable_retry_s
    assert refused.retry_after_s is not None and low <= refused.retry_after_s <= high
