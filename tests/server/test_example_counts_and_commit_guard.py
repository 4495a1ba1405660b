"""The coordinator credits an update with at most the examples its device declared (and the
task's maximum), and never commits non-finite weights or optimizer state."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator
from server.errors import InvalidArgument
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import check_in, make_coordinator, sign_header


def _coordinator(tmp_path: pathlib.Path, model_bytes: bytes, **config: object) -> Coordinator:
    coordinator = make_coordinator(SqliteStore(tmp_path / "c.sqlite"), FakeClock())
    values: dict[str, object] = dict(target_reports=2, over_selection=1.0, min_reports=2)
    values.update(config)
    coordinator.register_task(task_config(**values), model_bytes)
    return coordinator


def _token(coordinator: Coordinator, device_id: str, declared: int) -> bytes:
    response = check_in(coordinator, device_id, example_count=declared)
    return response.assignment.upload_token


def _upload(
    coordinator: Coordinator,
    token: bytes,
    delta: np.ndarray,
    example_count: int,
    metrics: common_pb2.ClientMetrics | None = None,
) -> None:
    header = device_pb2.UploadHeader(
        protocol_version=constants.PROTOCOL_VERSION,
        upload_token=token,
        example_count=example_count,
        num_elements=delta.size,
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        metrics=metrics or common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=10),
    )
    sign_header(header)
    coordinator.accept_upload(header, delta.astype("<f4").tobytes(), 0)
    coordinator.tick()  # the round driver ends the round if this report completed it


def test_a_count_above_the_declared_one_is_credited_as_declared(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, model_bytes)
    task = coordinator.task("t1")
    before = task.weights.astype(np.float64)
    n = task.record.num_parameters
    honest, attacker = _token(coordinator, "honest", 30), _token(coordinator, "mallory", 10)

    _upload(coordinator, honest, np.full(n, 0.01), 30)
    _upload(coordinator, attacker, np.full(n, 1e15), 1 << 62)

    # Weighted 10 (declared), not 2^62: the mean is (30 * 0.01 + 10 * 1e15) / 40.
    expected = before + (30 * 0.01 + 10 * 1e15) / 40
    np.testing.assert_allclose(task.weights, expected, rtol=1e-6)
    [record] = coordinator.rounds("t1")
    assert record.metrics["aggregator/total_weight"] == 40


def test_a_count_above_the_task_maximum_is_credited_at_the_maximum(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, model_bytes, max_examples_per_device=50)
    n = coordinator.task("t1").record.num_parameters
    tokens = [_token(coordinator, f"d{i}", 1 << 40) for i in range(2)]

    for token in tokens:
        _upload(coordinator, token, np.zeros(n), 1 << 40)

    [record] = coordinator.rounds("t1")
    assert record.metrics["aggregator/total_weight"] == 100


def test_client_metrics_are_capped_with_the_credited_count(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, model_bytes, epochs=2)
    n = coordinator.task("t1").record.num_parameters
    tokens = [_token(coordinator, f"d{i}", 10) for i in range(2)]
    inflated = common_pb2.ClientMetrics(
        loss=1e30, accuracy=1.0, num_examples=1 << 62, num_batches=1 << 62
    )

    for token in tokens:
        _upload(coordinator, token, np.zeros(n), 10, inflated)

    [record] = coordinator.rounds("t1")
    assert record.metrics["client_work/train/num_examples"] == 2 * 10 * 2
    assert np.isfinite(record.metrics["client_work/train/loss"])


@pytest.mark.parametrize(
    "metrics",
    [
        common_pb2.ClientMetrics(loss=float("inf"), accuracy=0.5),
        common_pb2.ClientMetrics(loss=1.0, accuracy=float("nan")),
        common_pb2.ClientMetrics(loss=1.0, accuracy=7.0),
        common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=-1),
    ],
)
def test_impossible_client_metrics_are_refused_and_change_nothing(
    tmp_path: pathlib.Path, model_bytes: bytes, metrics: common_pb2.ClientMetrics
) -> None:
    coordinator = _coordinator(tmp_path, model_bytes)
    n = coordinator.task("t1").record.num_parameters
    token = _token(coordinator, "d0", 10)

    with pytest.raises(InvalidArgument, match="client metrics"):
        _upload(coordinator, token, np.zeros(n), 10, metrics)

    round_ = coordinator.task("t1").current
    assert round_ is not None and round_.reported == 0 and round_.aggregate.count == 0


def test_a_round_whose_optimizer_state_is_not_finite_fails_instead_of_committing(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, model_bytes, server_optimizer="sgdm", server_momentum=0.9)
    task = coordinator.task("t1")
    before, sha = task.weights.copy(), task.weights_sha256
    # A state that overflowed (as Adam's preconditioner does on a huge update).
    task.optimizer_state["accumulator"][0] = np.inf
    n = task.record.num_parameters
    tokens = [_token(coordinator, f"d{i}", 10) for i in range(2)]

    for token in tokens:
        _upload(coordinator, token, np.full(n, 0.01), 10)

    [record] = coordinator.rounds("t1")
    assert record.state is RoundState.FAILED
    assert task.committed_rounds == 0 and task.weights_sha256 == sha
    np.testing.assert_array_equal(task.weights, before)
    assert np.all(np.isfinite(task.weights))
