"""Two replicas sharing one store decide who drives a task by lease (server/task_leadership.py),
on the SQLite file and on PostgreSQL, with a virtual clock."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from server.errors import StaleLeader
from server.store import Store
from server.task_leadership import TaskLeadership
from tests.fakes import FakeClock
from tests.server.test_store_conformance import StoreOpener, _committed, _opener

LEASE_S = 10.0
Replicas = tuple[FakeClock, TaskLeadership, TaskLeadership, list[Store]]


@pytest.fixture(params=["sqlite-file", "postgresql"])
def replicas(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Replicas]:
    """Replicas a and b, each with its own connection to one store, on one clock."""
    open_store: StoreOpener = _opener(request.param, request, tmp_path)
    stores = [open_store(), open_store()]
    clock = FakeClock()
    a = TaskLeadership(stores[0], clock, "replica-a", LEASE_S)
    b = TaskLeadership(stores[1], clock, "replica-b", LEASE_S)
    yield clock, a, b, stores
    for store in stores:
        store.close()


def test_one_replica_leads_a_task_and_the_other_waits(replicas: Replicas) -> None:
    _, a, b, _ = replicas

    led_by_a = a.refresh(["t1", "t2"])
    led_by_b = b.refresh(["t1", "t2", "t3"])

    assert led_by_a == {"t1", "t2"} and led_by_b == {"t3"}
    fence = a.fence("t1")
    assert fence is not None and fence.epoch == 1
    assert b.fence("t1") is None


def test_a_leader_that_renews_keeps_its_tasks(replicas: Replicas) -> None:
    clock, a, b, _ = replicas
    a.refresh(["t1"])

    for _ in range(10):
        clock.advance(a.renew_every_s)
        assert a.due()
        a.refresh(["t1"])
        b.refresh(["t1"])

    assert a.leads("t1") and not b.leads("t1")
    fence = a.fence("t1")
    assert fence is not None and fence.epoch == 1


def test_a_dead_leaders_task_passes_to_another_within_the_lease_time(replicas: Replicas) -> None:
    clock, a, b, _ = replicas
    a.refresh(["t1"])
    assert b.refresh(["t1"]) == set()

    clock.advance(LEASE_S)  # a renews no more

    assert not a.leads("t1")  # a stops driving on its own clock, without asking the store
    assert b.refresh(["t1"]) == {"t1"}
    fence = b.fence("t1")
    assert fence is not None and fence.epoch == 2


def test_a_paused_leader_wakes_up_and_its_commit_is_refused(replicas: Replicas) -> None:
    clock, a, b, stores = replicas
    a.refresh(["t1"])
    paused_fence = a.fence("t1")  # a computes a round's outcome, then stops (SIGSTOP)
    clock.advance(LEASE_S + 5)
    b.refresh(["t1"])

    with pytest.raises(StaleLeader):
        stores[0].commit_round(_committed(1, b"w1"), b"w1", ["tok"], fence=paused_fence)

    assert a.refresh(["t1"]) == set()
    stores[1].commit_round(_committed(1, b"w1"), b"w1", ["tok"], fence=b.fence("t1"))
    assert [r.round_number for r in stores[1].rounds("t1")] == [1]


def test_a_draining_replica_hands_its_tasks_over_at_once(replicas: Replicas) -> None:
    _, a, b, _ = replicas
    a.refresh(["t1", "t2"])

    a.release_all()

    assert not a.leads("t1")
    assert b.refresh(["t1", "t2"]) == {"t1", "t2"}
