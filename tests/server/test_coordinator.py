"""Coordinator logic without the network: selection, uploads, FedAvg, deadlines, restarts."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator, CoordinatorSettings
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import POPULATION, task_config
from tests.identities import check_in, make_coordinator, sign_failure, sign_header


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


def _check_in(
    coordinator: Coordinator, device_id: str, population: str = POPULATION
) -> device_pb2.CheckInResponse:
    coordinator.tick()  # the round driver's pass since the last request
    return check_in(coordinator, device_id, population)


def _header(
    token: bytes, num_elements: int, example_count: int = 10, encoding: str = "float32_delta"
) -> device_pb2.UploadHeader:
    return sign_header(
        device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=example_count,
            num_elements=num_elements,
            encoding=encoding,
            metrics=common_pb2.ClientMetrics(
                loss=1.0, accuracy=0.5, num_examples=example_count, num_batches=2
            ),
        )
    )


def _upload(
    coordinator: Coordinator, token: bytes, delta: np.ndarray, example_count: int = 10
) -> None:
    payload = delta.astype("<f4").tobytes()
    coordinator.accept_upload(_header(token, delta.size, example_count), payload, len(payload))
    coordinator.tick()  # the round driver ends the round if this report completed it


def test_round_selects_target_times_over_selection(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=2, over_selection=1.5)

    answers = [_check_in(coordinator, f"d{i}") for i in range(4)]

    assert [a.WhichOneof("outcome") for a in answers] == ["assignment"] * 3 + ["rejection"]
    assert answers[3].rejection.reason == device_pb2.Rejection.ROUND_FULL
    assert answers[3].retry_window.max_delay_s >= answers[3].retry_window.min_delay_s > 0
    assert coordinator.task("t1").current.state is RoundState.REPORTING


def test_a_device_is_selected_once_per_round(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)

    first, second = _check_in(coordinator, "same"), _check_in(coordinator, "same")

    assert first.HasField("assignment") and second.HasField("rejection")


def test_unknown_population_is_not_found(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)

    with pytest.raises(NotFound, match="unknown population 'cats'"):
        _check_in(coordinator, "d", population="cats")


def test_other_protocol_version_is_refused(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)

    with pytest.raises(FailedPrecondition, match="protocol version 99"):
        coordinator.check_in(
            device_pb2.CheckInRequest(protocol_version=99, population=POPULATION, device_id="d")
        )


def test_weighted_fedavg_with_server_learning_rate(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(
        store_path,
        clock,
        model_bytes,
        target_reports=2,
        over_selection=1.0,
        server_learning_rate=0.5,
    )
    task = coordinator.task("t1")
    before = task.weights.copy()
    rng = np.random.default_rng(0)
    d1, d2 = (rng.normal(size=before.size).astype(np.float32) for _ in range(2))
    t1, t2 = (_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(2))

    _upload(coordinator, t1, d1, example_count=1)
    _upload(coordinator, t2, d2, example_count=3)

    expected = before + 0.5 * (1 * d1.astype(np.float64) + 3 * d2) / 4
    np.testing.assert_allclose(task.weights, expected, atol=1e-6)
    [record] = coordinator.rounds("t1")
    assert (record.state, record.reported, record.selected) == (RoundState.COMMITTED, 2, 2)
    assert record.metrics["client_work/train/num_examples"] == 4


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h, p: (h, p[:-4]), "payload is"),
        (lambda h, p: (h, p + b"\0\0\0\0"), "payload is"),
        (lambda h, p: (_replace(h, example_count=0), p), "example_count must be positive"),
        (lambda h, p: (_replace(h, encoding="int8"), p), "encoding 'int8'"),
        (lambda h, p: (_replace(h, num_elements=3), p), "has 3 elements"),
    ],
)
def test_malformed_upload_is_refused_and_changes_nothing(
    store_path, clock, model_bytes, mutate, message
) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)
    task = coordinator.task("t1")
    token = _check_in(coordinator, "d").assignment.upload_token
    good = np.ones(task.record.num_parameters, np.float32)
    header, payload = mutate(_header(token, good.size), good.astype("<f4").tobytes())

    with pytest.raises(InvalidArgument, match=message):
        coordinator.accept_upload(header, payload, len(payload))

    current = task.current
    assert current.reported == 0 and current.aggregate.count == 0
    _upload(coordinator, token, good)  # the token was not burnt by the refusal
    assert current.reported == 1


def _replace(header: device_pb2.UploadHeader, **fields: object) -> device_pb2.UploadHeader:
    copy = device_pb2.UploadHeader()
    copy.CopyFrom(header)
    for name, value in fields.items():
        setattr(copy, name, value)
    return sign_header(copy)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_counted_with_weight_zero(store_path, clock, model_bytes, bad) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=2, over_selection=1.0)
    task = coordinator.task("t1")
    before = task.weights.copy()
    good_token, bad_token = (
        _check_in(coordinator, f"d{i}").assignment.upload_token for i in range(2)
    )
    poisoned = np.ones(before.size, np.float32)
    poisoned[3] = bad

    _upload(coordinator, bad_token, poisoned, example_count=1000)
    _upload(coordinator, good_token, np.full(before.size, 0.5, np.float32), example_count=10)

    np.testing.assert_allclose(task.weights, before + 0.5, atol=1e-6)
    [record] = coordinator.rounds("t1")
    assert record.reported == 2
    assert record.metrics["aggregator/num_nonfinite_updates"] == 1
    assert record.metrics["aggregator/total_weight"] == 10


def test_unknown_token_is_unauthenticated(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes)
    _check_in(coordinator, "d")

    with pytest.raises(Unauthenticated):
        _upload(
            coordinator,
            b"forged" * 6,
            np.zeros(coordinator.task("t1").record.num_parameters, np.float32),
        )


def test_reused_token_is_refused_while_the_round_is_open(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=2)
    task = coordinator.task("t1")
    token = _check_in(coordinator, "d").assignment.upload_token
    delta = np.ones(task.record.num_parameters, np.float32)
    _upload(coordinator, token, delta)

    with pytest.raises(AlreadyExists):
        _upload(coordinator, token, delta)

    assert task.current.reported == 1 and task.current.aggregate.total_weight == 10


def test_reused_token_after_commit_and_restart_is_refused(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=1, over_selection=1.0)
    token = _check_in(coordinator, "d").assignment.upload_token
    delta = np.ones(coordinator.task("t1").record.num_parameters, np.float32)
    _upload(coordinator, token, delta)

    restarted = make_coordinator(SqliteStore(store_path), clock)

    with pytest.raises(AlreadyExists):
        _upload(restarted, token, delta)
    assert len(restarted.rounds("t1")) == 1


def test_late_report_after_commit_is_refused(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=1, over_selection=2.0)
    early, late = (_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(2))
    delta = np.ones(coordinator.task("t1").record.num_parameters, np.float32)
    _upload(coordinator, early, delta)
    weights_after_commit = coordinator.task("t1").weights.copy()

    with pytest.raises(FailedPrecondition, match="round 1 of task 't1' is committed"):
        _upload(coordinator, late, delta)

    np.testing.assert_array_equal(coordinator.task("t1").weights, weights_after_commit)


def test_round_commits_at_reporting_deadline_with_min_reports(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(
        store_path, clock, model_bytes, target_reports=2, over_selection=1.5, min_reports=1
    )
    tokens = [_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(3)]
    delta = np.ones(coordinator.task("t1").record.num_parameters, np.float32)
    _upload(coordinator, tokens[0], delta)

    clock.advance(20.0)  # the reporting deadline; no tick has closed the round yet
    with pytest.raises(FailedPrecondition, match="round 1 of task 't1' passed its reporting"):
        _upload(coordinator, tokens[1], delta)
    coordinator.tick()

    [record] = coordinator.rounds("t1")
    assert (record.state, record.reported, record.dropped) == (RoundState.COMMITTED, 1, 2)


def test_round_below_minimum_fails_and_the_next_round_starts(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(
        store_path, clock, model_bytes, target_reports=2, over_selection=1.0, min_reports=2
    )
    weights = coordinator.task("t1").weights.copy()
    tokens = [_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(2)]
    _upload(coordinator, tokens[0], np.ones(weights.size, np.float32))

    clock.advance(20.0)
    coordinator.tick()
    retry = _check_in(coordinator, "d0")

    [record] = coordinator.rounds("t1")
    assert (record.state, record.reported) == (RoundState.FAILED, 1)
    np.testing.assert_array_equal(coordinator.task("t1").weights, weights)
    assert retry.assignment.round_number == 2
    with pytest.raises(FailedPrecondition):
        _upload(coordinator, tokens[1], np.ones(weights.size, np.float32))


def test_restart_resumes_from_the_last_committed_round(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=1, over_selection=1.0)
    token = _check_in(coordinator, "d").assignment.upload_token
    _upload(
        coordinator, token, np.full(coordinator.task("t1").record.num_parameters, 0.5, np.float32)
    )
    in_flight = _check_in(coordinator, "e").assignment  # round 2 open when the process dies
    committed = coordinator.task("t1").weights.copy()

    restarted = make_coordinator(SqliteStore(store_path), clock)

    task = restarted.task("t1")
    np.testing.assert_array_equal(task.weights, committed)
    assert task.committed_rounds == 1
    assert [(r.round_number, r.state) for r in restarted.rounds("t1")] == [
        (1, RoundState.COMMITTED),
        (2, RoundState.ABANDONED),
    ]
    with pytest.raises(FailedPrecondition, match="round 2 of task 't1' is abandoned"):
        _upload(restarted, in_flight.upload_token, np.zeros(task.record.num_parameters, np.float32))
    assert _check_in(restarted, "e").assignment.round_number == 3


def test_completed_task_rejects_with_no_task(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(
        store_path, clock, model_bytes, target_reports=1, over_selection=1.0, total_rounds=1
    )
    token = _check_in(coordinator, "d").assignment.upload_token
    _upload(coordinator, token, np.zeros(coordinator.task("t1").record.num_parameters, np.float32))

    answer = _check_in(coordinator, "e")

    assert answer.rejection.reason == device_pb2.Rejection.NO_TASK


def test_register_refuses_a_batch_size_the_model_was_not_exported_with(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(store_path, clock)

    with pytest.raises(InvalidArgument, match="'batch_size' is 32.*batch size 8"):
        coordinator.register_task(task_config(batch_size=32), model_bytes)


def test_register_refuses_fedprox_for_a_model_exported_without_it(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(store_path, clock)

    with pytest.raises(InvalidArgument, match="'fedprox_mu' is 0.1.*--fedprox"):
        coordinator.register_task(task_config(fedprox_mu=0.1), model_bytes)

    with pytest.raises(NotFound):
        coordinator.task("t1")


def test_register_refuses_a_file_that_is_not_a_model(store_path, clock) -> None:
    coordinator = _coordinator(store_path, clock)

    with pytest.raises(InvalidArgument, match="model rejected"):
        coordinator.register_task(task_config(), b"not a model at all")


def test_register_refuses_initial_weights_of_the_wrong_size(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock)

    with pytest.raises(InvalidArgument, match="initial weights must be"):
        coordinator.register_task(task_config(), model_bytes, initial_weights=b"\0" * 12)


def test_device_with_too_few_examples_is_not_eligible(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, min_examples=50)

    answer = _check_in(coordinator, "d")  # holds 10 examples

    assert answer.rejection.reason == device_pb2.Rejection.NOT_ELIGIBLE
    assert "at least 50 examples" in answer.rejection.message


def test_old_runtime_is_not_eligible(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, min_runtime_version="9.0.0")

    answer = _check_in(coordinator, "d")

    assert answer.rejection.reason == device_pb2.Rejection.NOT_ELIGIBLE
    assert "runtime >= 9.0.0" in answer.rejection.message


def test_minimum_separation_samples_without_replacement(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(
        store_path,
        clock,
        model_bytes,
        target_reports=1,
        over_selection=1.0,
        min_separation_s=3600.0,
    )
    token = _check_in(coordinator, "d").assignment.upload_token
    _upload(coordinator, token, np.zeros(coordinator.task("t1").record.num_parameters, np.float32))
    clock.advance(600.0)
    # A restarted coordinator has forgotten the retry window it gave; the store still knows.
    restarted = make_coordinator(SqliteStore(store_path), clock)

    too_soon = _check_in(restarted, "d")
    clock.advance(3000.0)
    later = _check_in(restarted, "d")

    assert too_soon.rejection.reason == device_pb2.Rejection.NOT_ELIGIBLE
    assert too_soon.retry_window.min_delay_s >= 3000.0
    assert later.HasField("assignment")


def test_next_round_selects_while_the_current_one_reports(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(
        store_path,
        clock,
        model_bytes,
        target_reports=1,
        over_selection=1.0,
        max_concurrent_rounds=2,
    )
    first = _check_in(coordinator, "a").assignment
    second = _check_in(coordinator, "b").assignment  # round 1 is reporting: round 2 selects
    third = _check_in(coordinator, "c")  # two rounds open: nothing more
    n = coordinator.task("t1").record.num_parameters

    _upload(coordinator, first.upload_token, np.full(n, 1.0, np.float32))
    _upload(coordinator, second.upload_token, np.full(n, 2.0, np.float32))

    assert (first.round_number, second.round_number) == (1, 2)
    assert second.weights.sha256 == first.weights.sha256  # both train from the initial model
    assert third.rejection.reason == device_pb2.Rejection.ROUND_FULL
    records = coordinator.rounds("t1")
    assert [r.metrics["round/staleness"] for r in records] == [0.0, 1.0]


def test_selection_deadline_closes_selection_with_enough_devices(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(
        store_path,
        clock,
        model_bytes,
        target_reports=3,
        over_selection=1.0,
        min_reports=2,
        selection_deadline_s=10.0,
    )
    _check_in(coordinator, "a")
    _check_in(coordinator, "b")

    clock.advance(10.0)
    late = _check_in(coordinator, "c")

    assert coordinator.task("t1").current.state is RoundState.REPORTING
    assert late.rejection.reason == device_pb2.Rejection.ROUND_FULL


def test_adam_server_state_is_checkpointed_with_the_commit(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(
        store_path,
        clock,
        model_bytes,
        target_reports=1,
        over_selection=1.0,
        server_optimizer="adam",
        server_learning_rate=0.01,
    )
    n = coordinator.task("t1").record.num_parameters
    _upload(
        coordinator, _check_in(coordinator, "a").assignment.upload_token, np.ones(n, np.float32)
    )
    state = coordinator.task("t1").optimizer_state

    restarted = make_coordinator(SqliteStore(store_path), clock)

    restored = restarted.task("t1").optimizer_state
    assert int(restored["step"]) == 1
    np.testing.assert_array_equal(restored["accumulator"], state["accumulator"])
    np.testing.assert_array_equal(restored["preconditioner"], state["preconditioner"])


def test_dropout_causes_are_recorded_per_round(store_path, clock, model_bytes) -> None:
    coordinator = _coordinator(store_path, clock, model_bytes, target_reports=1, over_selection=3.0)
    tokens = [_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(3)]
    coordinator.report_failure(
        sign_failure(
            device_pb2.FailureReport(
                protocol_version=constants.PROTOCOL_VERSION,
                upload_token=tokens[0],
                cause=device_pb2.FailureReport.INTERRUPTED,
            )
        )
    )
    _upload(
        coordinator, tokens[1], np.zeros(coordinator.task("t1").record.num_parameters, np.float32)
    )

    [record] = coordinator.rounds("t1")

    assert record.metrics["round/dropouts/interrupted"] == 1
    assert record.metrics["round/dropouts/no_report"] == 1
    assert record.dropped == 2


def test_upload_answer_spreads_the_device_by_population_size_and_capacity(
    store_path, clock, model_bytes
) -> None:
    # A coordinator that serves 4 check-ins/s lets devices take half of that.
    pace = PaceSteeringSettings(capacity_check_ins_per_s=4.0, capacity_utilization=0.5)
    coordinator = make_coordinator(SqliteStore(store_path), clock, CoordinatorSettings(pace=pace))
    coordinator.register_task(
        task_config(target_reports=2, over_selection=1.0, selection_deadline_s=10.0), model_bytes
    )
    token = _check_in(coordinator, "d0").assignment.upload_token
    for i in range(1, 40):  # 40 distinct devices seen; only d1 finds a seat
        _check_in(coordinator, f"d{i}")
    n = coordinator.task("t1").record.num_parameters
    payload = np.zeros(n, "<f4").tobytes()

    answer = coordinator.accept_upload(_header(token, n), payload, len(payload))

    spread = answer.retry_window.max_delay_s - answer.retry_window.min_delay_s
    assert spread == pytest.approx(40 / 2.0)  # N / (utilization * capacity)


def test_an_update_in_chunks_is_accepted_like_the_whole_payload(
    store_path, clock, model_bytes
) -> None:
    weights = []
    for name, split in (("whole", False), ("chunked", True)):
        coordinator = _coordinator(
            store_path.with_name(f"{name}.sqlite"), clock, model_bytes, target_reports=1
        )
        token = _check_in(coordinator, "d0").assignment.upload_token
        n = coordinator.task("t1").record.num_parameters
        payload = np.linspace(-1, 1, n, dtype="<f4").tobytes()
        header = _header(token, n)
        if split:
            coordinator.accept_upload(header, [payload[:1001], payload[1001:]], len(payload))
        else:
            coordinator.accept_upload(header, payload, len(payload))
        weights.append(coordinator.task("t1").weights)

    np.testing.assert_array_equal(weights[0], weights[1])


def test_pace_steering_guesses_early_until_a_round_has_been_measured(
    store_path, clock, model_bytes
) -> None:
    coordinator = _coordinator(
        store_path,
        clock,
        model_bytes,
        target_reports=2,
        over_selection=1.0,
        reporting_deadline_s=600.0,
    )
    tokens = [_check_in(coordinator, f"d{i}").assignment.upload_token for i in range(2)]
    delta = np.ones(coordinator.task("t1").record.num_parameters, np.float32)

    # Nothing measured: twice the time elapsed (none yet), not the deadline (600 s) ...
    first = _check_in(coordinator, "late-0").retry_window.min_delay_s
    clock.advance(200.0)
    # ... and once that has passed, twice the time elapsed (ends at 400 s: 200 s from now).
    second = _check_in(coordinator, "late-1").retry_window.min_delay_s
    clock.advance(40.0)
    for token in tokens:
        _upload(coordinator, token, delta)  # round 1 reported for 240 s
    round_two = [_check_in(coordinator, f"e{i}").assignment.upload_token for i in range(2)]
    measured = _check_in(coordinator, "late-2").retry_window.min_delay_s

    # Jitter: at most 10 % of the spread; 7 devices are bunched within 1 s.
    jitter = 0.1
    assert 1.0 <= first < 1.0 + jitter
    assert 200.0 <= second < 200.0 + jitter
    assert len(round_two) == 2 and 240.0 <= measured < 240.0 + jitter
