"""One conformance suite that every coordinator store implementation must pass: SQLite in
memory, SQLite on file, and PostgreSQL (a real server, started for the session by
tests/postgres_server.py)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import pathlib
import threading
from collections.abc import Callable, Iterator

import pytest

from server.config import TaskConfig
from server.errors import AlreadyExists, StaleLeader
from server.leases import Lease
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


@pytest.mark.parametrize(
    "open_store", ["sqlite-memory", "sqlite-file", "postgresql"], indirect=True
)
class TestTaskLeases:
    """Leadership by lease with fencing (server/leases.py), the same on every store."""

    def test_the_first_acquirer_leads_at_epoch_one(self, store: Store) -> None:
        lease = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        assert lease == Lease("t1", "replica-a", 1, 110.0)
        assert store.current_lease("t1") == lease
        assert store.current_lease("t2") is None

    def test_the_leader_renews_at_the_same_epoch(self, store: Store) -> None:
        store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        renewed = store.acquire_lease("t1", "replica-a", now=105.0, duration_s=10.0)

        assert renewed == Lease("t1", "replica-a", 1, 115.0)

    def test_another_replica_waits_while_the_lease_is_live(self, store: Store) -> None:
        lease = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        refused = store.acquire_lease("t1", "replica-b", now=109.9, duration_s=10.0)

        assert refused is None
        assert store.current_lease("t1") == lease

    def test_an_expired_lease_passes_to_another_replica_at_the_next_epoch(
        self, store: Store
    ) -> None:
        store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        taken = store.acquire_lease("t1", "replica-b", now=110.0, duration_s=10.0)

        assert taken == Lease("t1", "replica-b", 2, 120.0)
        assert store.acquire_lease("t1", "replica-a", now=111.0, duration_s=10.0) is None

    def test_a_leader_back_after_its_lease_lapsed_starts_a_new_epoch(self, store: Store) -> None:
        store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        back = store.acquire_lease("t1", "replica-a", now=130.0, duration_s=10.0)

        assert back == Lease("t1", "replica-a", 2, 140.0)

    def test_a_released_lease_is_free_at_once_and_a_stale_release_changes_nothing(
        self, store: Store
    ) -> None:
        first = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)
        assert first is not None
        store.release_lease(first)

        taken = store.acquire_lease("t1", "replica-b", now=101.0, duration_s=10.0)
        store.release_lease(first)  # the old leader releasing again, late

        assert taken == Lease("t1", "replica-b", 2, 111.0)
        assert store.current_lease("t1") == taken

    def test_the_current_leader_commits(self, store: Store) -> None:
        lease = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        store.commit_round(_committed(1, b"w1"), b"w1", ["tok-a"], fence=lease)

        assert [r.round_number for r in store.rounds("t1")] == [1]

    def test_a_stale_leaders_commit_is_refused_and_changes_nothing(self, store: Store) -> None:
        stale = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)
        store.acquire_lease("t1", "replica-b", now=125.0, duration_s=10.0)  # a took a long nap

        with pytest.raises(StaleLeader, match="another replica leads it now"):
            store.commit_round(_committed(1, b"w1"), b"w1", ["tok-a"], fence=stale)

        assert store.rounds("t1") == []
        assert not store.is_counted("tok-a")
        assert store.get_resource(hashlib.sha256(b"w1").hexdigest()) is None

    def test_a_stale_leader_cannot_record_a_failed_round(self, store: Store) -> None:
        stale = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)
        store.acquire_lease("t1", "replica-b", now=125.0, duration_s=10.0)
        failed = RoundRecord("t1", 1, RoundState.FAILED, 3, 0, 3, {}, 1.0, 2.0)

        with pytest.raises(StaleLeader):
            store.record_closed_round(failed, fence=stale)

        assert store.rounds("t1") == []

    def test_an_expired_lease_still_fences_while_no_one_took_over(self, store: Store) -> None:
        # Fencing is by epoch, not by clock: with no other leader, this commit is the only one.
        lapsed = store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)

        store.commit_round(_committed(1, b"w1"), b"w1", [], fence=lapsed)

        assert [r.round_number for r in store.rounds("t1")] == [1]


@pytest.mark.parametrize("open_store", ["sqlite-file", "postgresql"], indirect=True)
@pytest.mark.parametrize("task", ["never led", "its leader's lease expired"])
def test_of_replicas_racing_for_a_task_exactly_one_leads(
    open_store: StoreOpener, task: str
) -> None:
    replicas = [open_store() for _ in range(6)]
    if task == "its leader's lease expired":
        replicas[0].acquire_lease("t1", "replica-gone", now=0.0, duration_s=10.0)
    start = threading.Barrier(len(replicas))

    def race(store: Store, name: str) -> Lease | None:
        start.wait()
        return store.acquire_lease("t1", name, now=100.0, duration_s=10.0)

    with concurrent.futures.ThreadPoolExecutor(len(replicas)) as pool:
        leases = list(pool.map(race, replicas, [f"replica-{i}" for i in range(len(replicas))]))

    granted = [lease for lease in leases if lease is not None]
    assert len(granted) == 1
    assert replicas[0].current_lease("t1") == granted[0]
