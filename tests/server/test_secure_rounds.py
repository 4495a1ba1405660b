"""secure_aggregator() rounds in the coordinator, driven in process: real SecAgg clients and
server, a fake clock, no network (tests/e2e/test_secure_rounds.py runs them over gRPC)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime import constants
from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.secure_upload import secure_mean_encoding
from protos import common_pb2, device_pb2, secagg_pb2
from server.coordinator import Coordinator
from server.errors import FailedPrecondition, InvalidArgument
from server.secagg.round_aggregator import SecureSumRoundAggregator
from server.secagg.server import SecAggServer
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import POPULATION, task_config
from tests.identities import check_in, device_key, make_coordinator, sign_failure, sign_header

AGGREGATOR = "secure_aggregator(clip=0.5)"


def _coordinator(tmp_path: pathlib.Path, clock: FakeClock, model_bytes: bytes) -> Coordinator:
    coordinator = make_coordinator(SqliteStore(tmp_path / "c.sqlite"), clock)
    config = task_config(
        target_reports=7, over_selection=1.14, min_reports=5, aggregator=AGGREGATOR
    )
    coordinator.register_task(config, model_bytes)
    return coordinator


def _select(coordinator: Coordinator, count: int, first: int = 0) -> list[device_pb2.Assignment]:
    assignments = []
    for i in range(first, first + count):
        response = check_in(coordinator, f"d{i}", POPULATION, example_count=40)
        assignments.append(response.assignment)
    return assignments


def _session(coordinator: Coordinator) -> SecAggServer:
    round_ = coordinator.task("t1").current
    assert round_ is not None and isinstance(round_.aggregate, SecureSumRoundAggregator)
    assert round_.aggregate.session is not None
    return round_.aggregate.session


def _envelope(client: SecAggClient) -> secagg_pb2.SecAggClientMessage:
    return client.envelope()


def _share_keys(session: SecAggServer, clients: list[SecAggClient]) -> None:
    for client in clients:
        message = _envelope(client)
        message.advertise_keys.CopyFrom(client.advertise_keys())
        session.receive(message)
    for client in clients:
        e = _envelope(client)
        request = session.server_message(e.session_id, e.client_id, e.session_token)
        message = _envelope(client)
        message.share_keys.CopyFrom(client.share_keys(request.share_keys_request))
        session.receive(message)


def _send_masked(
    session: SecAggServer, client: SecAggClient, assignment: device_pb2.Assignment
) -> None:
    e = _envelope(client)
    request = session.server_message(e.session_id, e.client_id, e.session_token)
    config = session.session_config(e.client_id)
    encoding = secure_mean_encoding(assignment.aggregation, config)
    # As a device does: values 0.01 * client id / sqrt(n), L2 norm 0.01 * id, under the clip.
    n = config.vector_length - 1
    delta = np.full(n, 0.01 * e.client_id / np.sqrt(n), np.float32)
    quantized = encoding.encode(delta, 40.0, np.random.default_rng(e.client_id))
    masked = client.masked_input(request.masked_input_request, quantized)
    session.receive_masked_input(e.session_id, e.client_id, e.session_token, masked)


def _report(assignment: device_pb2.Assignment, num_parameters: int) -> device_pb2.UploadHeader:
    return sign_header(
        device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=assignment.upload_token,
            example_count=40,
            num_elements=num_parameters,
            encoding=constants.UPDATE_ENCODING_SECURE_SUM,
            metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=40),
        )
    )


def test_the_session_opens_when_selection_closes_with_the_selected_devices(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, FakeClock(), model_bytes)

    first = _select(coordinator, 7)
    round_ = coordinator.task("t1").current
    assert round_ is not None and isinstance(round_.aggregate, SecureSumRoundAggregator)
    pending = round_.aggregate.session
    last = _select(coordinator, 1, first=7)[0]

    assert pending is None  # n is unknown while the round selects
    session = _session(coordinator)
    assert session.num_clients == 8 and round_.state is RoundState.REPORTING
    enrolled = [a.secure_aggregation for a in [*first, last]]
    assert [e.client_id for e in enrolled] == list(range(1, 9))
    assert all(e.session_id == session.session_id for e in enrolled)
    assert last.aggregation.encoding == constants.UPDATE_ENCODING_SECURE_SUM
    assert last.aggregation.clipping.bound == 0.5


def test_below_threshold_the_round_fails_and_the_task_opens_a_new_one(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    coordinator = _coordinator(tmp_path, clock, model_bytes)
    assignments = _select(coordinator, 8)
    session = _session(coordinator)
    clients = [SecAggClient(session.session_config(i + 1), device_key(f"d{i}")) for i in range(8)]
    _share_keys(session, clients)
    for client, assignment in list(zip(clients, assignments, strict=True))[:3]:
        _send_masked(session, client, assignment)  # 3 survivors, t = 4

    clock.advance(0.86 * 20.0)  # past the masked-input stage's deadline
    coordinator.tick()
    coordinator.tick()

    assert session.stage == secagg_pb2.ABORTED
    rounds = coordinator.rounds("t1")
    assert [r.state for r in rounds] == [RoundState.FAILED]
    retry = _select(coordinator, 1, first=20)[0]
    assert retry.round_number == 2 and retry.secure_aggregation.client_id == 1


def test_a_device_that_reports_failure_is_a_session_dropout(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, FakeClock(), model_bytes)
    assignments = _select(coordinator, 8)
    session = _session(coordinator)

    coordinator.report_failure(
        sign_failure(
            device_pb2.FailureReport(
                protocol_version=constants.PROTOCOL_VERSION,
                upload_token=assignments[2].upload_token,
                cause=device_pb2.FailureReport.INTERRUPTED,
            )
        )
    )

    assert 3 not in session.waiting_for() and len(session.waiting_for()) == 7


def test_a_round_commits_the_secure_mean_and_refuses_reports_without_masked_input(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, FakeClock(), model_bytes)
    task = coordinator.task("t1")
    before = task.weights.copy()
    n_params = task.record.num_parameters
    assignments = _select(coordinator, 8)
    session = _session(coordinator)
    clients = [SecAggClient(session.session_config(i + 1), device_key(f"d{i}")) for i in range(8)]
    _share_keys(session, clients)
    round_ = task.current
    assert round_ is not None

    # A report before the device's masked input is in the sum: refused, nothing changes.
    with pytest.raises(FailedPrecondition, match="masked input"):
        coordinator.accept_upload(_report(assignments[0], n_params), b"", 0)
    with pytest.raises(InvalidArgument, match="SecAggService"):
        plain = _report(assignments[0], n_params)
        plain.encoding = constants.UPDATE_ENCODING_FLOAT32_DELTA
        sign_header(plain)
        coordinator.accept_upload(plain, np.zeros(n_params, "<f4").tobytes(), 0)
    assert round_.reported == 0 and round_.aggregate.count == 0

    for client, assignment in list(zip(clients, assignments, strict=True))[:7]:
        _send_masked(session, client, assignment)
        with pytest.raises(InvalidArgument, match="no payload"):
            coordinator.accept_upload(_report(assignment, n_params), b"\x00" * 4, 0)
        coordinator.accept_upload(_report(assignment, n_params), b"", 0)
    coordinator.tick()  # 7 masked inputs = the target: the stage closes
    for client in clients[:7]:
        e = _envelope(client)
        request = session.server_message(e.session_id, e.client_id, e.session_token)
        message = _envelope(client)
        message.unmasking_response.CopyFrom(client.unmasking_response(request.unmasking_request))
        session.receive(message)
    coordinator.tick()

    record = coordinator.rounds("t1")[-1]
    assert record.state is RoundState.COMMITTED and record.reported == 7
    assert record.metrics["aggregator/secure_sum/num_summed"] == 7
    # Equal weights: the mean of 0.01 * client id over clients 1..7 is 0.04 (/ sqrt(n)).
    assert np.allclose(task.weights - before, 0.04 / np.sqrt(n_params), rtol=1e-3, atol=1e-7)


def test_adaptive_bounds_are_refused_for_the_secure_aggregator(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = make_coordinator(SqliteStore(tmp_path / "c.sqlite"), FakeClock())

    with pytest.raises(InvalidArgument, match="adaptive zeroing is not supported"):
        coordinator.register_task(
            task_config(aggregator="secure_aggregator(zeroing=true)"), model_bytes
        )
    with pytest.raises(InvalidArgument, match="clip must be positive"):
        coordinator.register_task(task_config(aggregator="secure_aggregator(clip=0)"), model_bytes)
    assert coordinator.task_ids() == []
