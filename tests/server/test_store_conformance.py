"""One conformance suite that every coordinator store implementation must pass: SQLite in
memory, SQLite on file, and PostgreSQL (a real server, started for the session by
tests/postgres_server.py)."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable, Iterator

import pytest

from server.config import TaskConfig
from server.errors import AlreadyExists
from server.postgres_store import PostgresStore
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


def _committed(round_number: int, weights: bytes) -> RoundRecord:
    return RoundRecord(
        "t1",
        round_number,
        RoundState.COMMITTED,
        3,
        2,
        1,
        {"eval/accuracy": 0.5},
        10.0,
        20.0,
        hashlib.sha256(weights).hexdigest(),
    )


StoreOpener = Callable[[], Store]


def _opener(kind: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> StoreOpener:
    """Opens the same store each time it is called (a new, empty one per test)."""
    match kind:
        case "sqlite-memory":
            return lambda: SqliteStore(":memory:")
        case "sqlite-file":
            return lambda: SqliteStore(tmp_path / "store.sqlite")
        case "postgresql":
            url = request.getfixturevalue("postgres_url")
            return lambda: PostgresStore(url)
    raise AssertionError(kind)


@pytest.fixture
def open_store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[StoreOpener]:
    opened: list[Store] = []
    make = _opener(request.param, request, tmp_path)

    def open_() -> Store:
        opened.append(make())
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreOpener) -> Store:
    return open_store()


@pytest.mark.parametrize(
    "open_store", ["sqlite-memory", "sqlite-file", "postgresql"], indirect=True
)
class TestStoreConformance:
    """Every test here must pass for every implementation."""

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

    def test_an_assignment_is_found_by_its_token_hash(self, store: Store) -> None:
        issued = AssignmentRecord("h" * 64, "t1", 1, "dev-a", 5.0)

        store.add_assignment(issued)
        store.add_assignment(AssignmentRecord("g" * 64, "t1", 1, "dev-a", 7.5))

        assert store.assignment("h" * 64) == issued
        assert store.assignment("x" * 64) is None
        assert store.last_assignment_time("t1", "dev-a") == 7.5
        assert store.last_assignment_time("t1", "dev-b") is None

    def test_rounds_with_assignments_but_no_record_are_unrecorded(self, store: Store) -> None:
        store.add_task(_task())
        for token, round_number, issued_at in [("a", 1, 3.0), ("b", 2, 4.0), ("c", 2, 2.0)]:
            store.add_assignment(AssignmentRecord(token * 64, "t1", round_number, "d", issued_at))
        store.commit_round(_committed(1, b"w1"), b"w1", ["a" * 64])

        assert store.unrecorded_rounds("t1") == [UnrecordedRound(2, 2, 2.0)]
        assert store.unrecorded_rounds("t2") == []

    def test_the_server_state_is_the_latest_committed_one(self, store: Store) -> None:
        store.add_task(_task())
        assert store.server_state("t1") == b""

        store.commit_round(_committed(1, b"w1"), b"w1", [], server_state=b"state-1")
        store.commit_round(_committed(2, b"w2"), b"w2", [], server_state=b"state-2")

        assert store.server_state("t1") == b"state-2"

    def test_a_closed_round_is_recorded_once(self, store: Store) -> None:
        failed = RoundRecord("t1", 1, RoundState.FAILED, 3, 0, 3, {}, 1.0, 2.0)
        store.record_closed_round(failed)

        with pytest.raises(AlreadyExists):
            store.record_closed_round(failed)
        assert store.rounds("t1") == [failed]


@pytest.mark.parametrize("open_store", ["sqlite-file", "postgresql"], indirect=True)
class TestDurableStores:
    def test_state_survives_reopening(self, open_store: StoreOpener) -> None:
        store = open_store()
        store.add_task(_task())
        store.commit_round(_committed(1, b"w1"), b"w1", ["tok"])
        store.close()

        reopened = open_store()

        assert reopened.tasks() == [_task()]
        assert reopened.is_counted("tok")
        assert reopened.rounds("t1") == [_committed(1, b"w1")]

    def test_an_operator_decision_survives_reopening(self, open_store: StoreOpener) -> None:
        store = open_store()
        store.add_task(_task())
        store.set_task_state("t1", TaskState.CANCELLED)
        store.close()

        reopened = open_store()

        assert reopened.tasks()[0].state is TaskState.CANCELLED
