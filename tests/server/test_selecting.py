"""SELECTING: when a round stops taking devices."""

from __future__ import annotations

import pytest

from server.aggregation import EvaluationReports
from server.coordinator import Coordinator
from server.errors import InvalidArgument
from server.rounds import selecting
from server.rounds.round import AssignmentState, RoundInProgress
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import task_config


def _round_with(selected: int) -> RoundInProgress:
    round_ = RoundInProgress("t1", 1, EvaluationReports(), 0.0, "sha", 0)
    for i in range(selected):
        round_.assign(f"d{i}", f"token-{i}", 10)
    return round_


def test_past_the_deadline_selection_closes_with_min_reports_devices() -> None:
    config = task_config(target_reports=5, over_selection=1.4, min_reports=4)

    state = selecting.next_state(_round_with(4), config, now=config.selection_deadline_s)

    assert state is RoundState.REPORTING


def test_a_round_that_needs_more_devices_keeps_selecting_past_its_deadline() -> None:
    config = task_config(target_reports=5, over_selection=1.4, min_reports=4)

    state = selecting.next_state(
        _round_with(4), config, now=config.selection_deadline_s, min_selected=5
    )

    assert state is RoundState.SELECTING


def test_first_reports_do_not_close_selection_before_the_quota() -> None:
    # Over-selection holds: devices selected first may report while the round selects.
    config = task_config(target_reports=10, over_selection=1.3)
    round_ = _round_with(8)
    for i in range(3):
        round_.set_state(f"token-{i}", AssignmentState.REPORTED)

    state = selecting.next_state(round_, config, now=1.0)

    assert state is RoundState.SELECTING
    assert selecting.takes_devices(round_, config)


def test_a_secure_task_that_would_select_too_few_devices_is_refused(model_bytes: bytes) -> None:
    coordinator = Coordinator(SqliteStore(":memory:"), FakeClock())
    config = task_config(target_reports=3, over_selection=1.3, aggregator="secure_aggregator()")

    with pytest.raises(InvalidArgument, match="select 4 devices, but secure_aggregator"):
        coordinator.register_task(config, model_bytes)
