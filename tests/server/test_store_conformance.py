"""One conformance suite that every coordinator store implementation must pass."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

from server.config import TaskConfig
from server.errors import AlreadyExists
from server.sqlite_store import SqliteStore
from server.store import (
    AssignmentRecord,
    EnrolledDevice,
    RoundRecord,
    RoundState,
    Store,
    TaskRecord,
    TaskState,
    UnrecordedRound,
)


def _task(task_id: str = "t1") -> TaskRecord:
    return TaskRecord(TaskConfig(task_id=task_id, population="p"), "m" * 64, "w" * 64, 10, 1.0)


def _committed(round_number: int, weights: bytes, finished_at: float = 20.0) -> RoundRecord:
    return RoundRecord(
        "t1",
        round_number,
        RoundState.COMMITTED,
        3,
        2,
        1,
        {"eval/accuracy": 0.5},
        finished_at - 10.0,
        finished_at,
        hashlib.sha256(weights).hexdigest(),
    )


def _assignment(
    token: str, round_number: int, issued_at: float, device: str = "d"
) -> AssignmentRecord:
    return AssignmentRecord(token, "t1", round_number, device, issued_at)


def _history(store: Store) -> None:
    """Rounds 1 and 2 committed (finished at 110 and 210), round 3 failed (at 310), round 4
    open; one assignment per round, issued at 100, 200, 300 and 400."""
    store.add_task(_task())
    for number in (1, 2, 3, 4):
        store.add_assignment(_assignment(f"tok-{number}", number, 100.0 * number, f"d{number}"))
    store.commit_round(_committed(1, b"w1", 110.0), b"w1", ["tok-1"], b"state-1")
    store.commit_round(_committed(2, b"w2", 210.0), b"w2", ["tok-2"], b"state-2")
    store.record_closed_round(RoundRecord("t1", 3, RoundState.FAILED, 1, 0, 1, {}, 300.0, 310.0))


class StoreConformance:
    """Subclasses provide `store`; every test here must pass for every implementation."""

    @pytest.fixture
    def store(self, tmp_path: pathlib.Path) -> Store:
        raise NotImplementedError

    def test_resources_are_content_addressed_and_idempotent(self, store: Store) -> None:
        first = store.put_resource("model", b"abc")
        second = store.put_resource("model", b"abc")

        assert first == second == hashlib.sha256(b"abc").hexdigest()
        assert store.get_resource(first) == b"abc"
        assert store.get_resource("0" * 64) is None

    def test_task_ids_are_unique(self, store: Store) -> None:
        store.add_task(_task())

        with pytest.raises(AlreadyExists):
            store.add_task(_task())
        assert [t.config.task_id for t in store.tasks()] == ["t1"]

    def test_task_round_trips(self, store: Store) -> None:
        store.add_task(_task())

        assert store.tasks() == [_task()]

    def test_a_task_starts_running_and_keeps_the_latest_operator_decision(
        self, store: Store
    ) -> None:
        store.add_task(_task("t1"))
        store.add_task(_task("t2"))

        store.set_task_state("t1", TaskState.PAUSED)
        store.set_task_state("t1", TaskState.CANCELLED)

        assert [t.state for t in store.tasks()] == [TaskState.CANCELLED, TaskState.RUNNING]

    def test_commit_makes_round_weights_and_tokens_visible_together(self, store: Store) -> None:
        store.add_task(_task())

        store.commit_round(_committed(1, b"w1"), b"w1", ["tok-a", "tok-b"])

        [record] = store.rounds("t1")
        assert record == _committed(1, b"w1")
        assert store.get_resource(record.weights_sha256) == b"w1"
        assert store.is_counted("tok-a") and store.is_counted("tok-b")
        assert not store.is_counted("tok-c")

    def test_a_token_is_never_counted_twice(self, store: Store) -> None:
        store.add_task(_task())
        store.commit_round(_committed(1, b"w1"), b"w1", ["tok-a"])

        with pytest.raises(AlreadyExists):
            store.commit_round(_committed(2, b"w2"), b"w2", ["tok-b", "tok-a"])

        # Nothing of the refused commit is visible.
        assert [r.round_number for r in store.rounds("t1")] == [1]
        assert not store.is_counted("tok-b")
        assert store.get_resource(hashlib.sha256(b"w2").hexdigest()) is None

    def test_a_round_is_committed_once(self, store: Store) -> None:
        store.add_task(_task())
        store.commit_round(_committed(1, b"w1"), b"w1", [])

        with pytest.raises(AlreadyExists):
            store.commit_round(_committed(1, b"w1"), b"w1", [])

    def test_failed_rounds_are_listed_in_order(self, store: Store) -> None:
        store.add_task(_task())
        store.commit_round(_committed(2, b"w2"), b"w2", [])

        store.record_closed_round(RoundRecord("t1", 1, RoundState.FAILED, 3, 0, 3, {}, 1.0, 2.0))

        assert [(r.round_number, r.state) for r in store.rounds("t1")] == [
            (1, RoundState.FAILED),
            (2, RoundState.COMMITTED),
        ]

    def test_an_enrolled_key_is_found_in_its_population_only(self, store: Store) -> None:
        device = EnrolledDevice("a" * 64, "p", b"key-der", "shared-secret", 5.0)

        added = store.enroll_device(device)

        assert added
        assert store.enrolled_device("a" * 64, "p") == device
        assert store.enrolled_device("a" * 64, "other") is None
        assert store.enrolled_device("b" * 64, "p") is None
        assert store.enrolled_devices("p") == 1

    def test_enrolling_again_changes_nothing(self, store: Store) -> None:
        first = EnrolledDevice("a" * 64, "p", b"key-der", "shared-secret", 5.0)
        store.enroll_device(first)

        again = store.enroll_device(EnrolledDevice("a" * 64, "p", b"other", "allowlist", 9.0))

        assert not again
        assert store.enrolled_device("a" * 64, "p") == first
        assert store.enrolled_devices("p") == 1

    def test_pruning_forgets_old_assignments_of_closed_rounds_only(self, store: Store) -> None:
        _history(store)

        store.prune_history("t1", before=1000.0)

        assert store.assignment("tok-1") is None
        assert store.assignment("tok-3") is None
        assert not store.is_counted("tok-1") and not store.is_counted("tok-2")
        # Round 4 has no record: a restart must still find it and abandon it.
        assert store.assignment("tok-4") == _assignment("tok-4", 4, 400.0, "d4")
        assert store.unrecorded_rounds("t1") == [UnrecordedRound(4, 1, 400.0)]

    def test_pruning_keeps_what_was_issued_after_the_cutoff(self, store: Store) -> None:
        _history(store)

        store.prune_history("t1", before=250.0)

        assert store.assignment("tok-1") is None
        assert store.assignment("tok-2") is None
        assert store.assignment("tok-3") == _assignment("tok-3", 3, 300.0, "d3")
        assert store.last_assignment_time("t1", "d3") == 300.0
        assert store.last_assignment_time("t1", "d1") is None

    def test_pruning_keeps_the_latest_weights_state_and_every_round_record(
        self, store: Store
    ) -> None:
        _history(store)
        rounds = store.rounds("t1")

        store.prune_history("t1", before=1000.0)

        assert store.rounds("t1") == rounds
        assert store.get_resource(hashlib.sha256(b"w1").hexdigest()) is None
        assert store.get_resource(hashlib.sha256(b"w2").hexdigest()) == b"w2"
        assert store.server_state("t1") == b"state-2"
        assert store.get_resource("w" * 64) is None  # initial weights were never stored here

    def test_pruning_keeps_weights_another_round_still_names(self, store: Store) -> None:
        _history(store)
        store.commit_round(_committed(5, b"w1", 510.0), b"w1", [], b"state-5")

        store.prune_history("t1", before=300.0)

        assert store.get_resource(hashlib.sha256(b"w1").hexdigest()) == b"w1"

    def test_pruning_leaves_other_tasks_alone(self, store: Store) -> None:
        _history(store)
        store.add_task(_task("t2"))
        store.add_assignment(AssignmentRecord("other", "t2", 1, "d1", 100.0))
        store.record_closed_round(RoundRecord("t2", 1, RoundState.FAILED, 1, 0, 1, {}, 1.0, 2.0))

        store.prune_history("t1", before=1000.0)

        assert store.assignment("other") is not None

    def test_pruning_twice_removes_nothing_more(self, store: Store) -> None:
        _history(store)
        first = store.prune_history("t1", before=1000.0)

        second = store.prune_history("t1", before=1000.0)

        assert first > 0
        assert second == 0


class TestSqliteInMemory(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: pathlib.Path) -> Store:
        return SqliteStore(":memory:")


class TestSqliteFile(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: pathlib.Path) -> Store:
        return SqliteStore(tmp_path / "store.sqlite")

    def test_state_survives_reopening(self, tmp_path: pathlib.Path) -> None:
        store = SqliteStore(tmp_path / "s.sqlite")
        store.add_task(_task())
        store.commit_round(_committed(1, b"w1"), b"w1", ["tok"])
        store.close()

        reopened = SqliteStore(tmp_path / "s.sqlite")

        assert reopened.tasks() == [_task()]
        assert reopened.is_counted("tok")
        assert reopened.rounds("t1") == [_committed(1, b"w1")]

    def test_an_operator_decision_survives_reopening(self, tmp_path: pathlib.Path) -> None:
        store = SqliteStore(tmp_path / "s.sqlite")
        store.add_task(_task())
        store.set_task_state("t1", TaskState.CANCELLED)
        store.close()

        reopened = SqliteStore(tmp_path / "s.sqlite")

        assert reopened.tasks()[0].state is TaskState.CANCELLED
