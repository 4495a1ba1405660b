"""Three coordinator replicas on one real PostgreSQL database, in process, on one virtual clock:
global selection, uploads counted once, partial aggregates merged by the task's leader, a
replica's death and a leader's death (server/replica_coordinator.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np
import pytest

from device_runtime import constants
from device_runtime.aggregation.client import encode_for_upload
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator
from server.drain import abandon_open_rounds
from server.errors import AlreadyExists, FailedPrecondition, HostedElsewhere, Unauthenticated
from server.leases import default_lease_s
from server.postgres_store import PostgresStore
from server.replica_coordinator import ReplicaCoordinator
from server.replica_leader import REPLICA_LOST
from server.sqlite_store import SqliteStore
from server.store import RoundRecord, RoundState, TaskState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import (
    check_in,
    enroll,
    identities_for,
    make_coordinator,
    send_check_in,
    sign_failure,
    sign_header,
    signed_check_in,
)

NUM_PARAMETERS_SEED = 7


class Cluster:
    def __init__(self, url: str, clock: FakeClock, size: int) -> None:
        self.clock = clock
        self.url = url
        self.stores: list[PostgresStore] = []
        self.replicas = [self.start(f"replica-{i}") for i in range(size)]

    def start(self, name: str) -> ReplicaCoordinator:
        store = PostgresStore(self.url)
        self.stores.append(store)
        return ReplicaCoordinator(
            store,
            self.clock,
            name,
            identities=identities_for(store, self.clock),
            rng=np.random.default_rng(len(self.stores)),
        )

    def tick(self, replicas: list[ReplicaCoordinator] | None = None, passes: int = 3) -> None:
        """Replication and driver passes on every (living) replica, in turn."""
        for _ in range(passes):
            for replica in replicas if replicas is not None else self.replicas:
                replica.tick()

    def wait(self, seconds: float, replicas: list[ReplicaCoordinator]) -> None:
        """Lets `seconds` pass with a pass of each replica every half renewal interval, as
        their loops would (a leader renews its lease on time)."""
        step = default_lease_s / 6
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.tick(replicas, passes=1)

    def leader(self, among: list[ReplicaCoordinator] | None = None) -> ReplicaCoordinator:
        (leader,) = [r for r in among or self.replicas if r.leadership.leads("t1")]
        return leader

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def cluster(postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(postgres_url, FakeClock(), 3)
    yield made
    made.close()


def _registered(cluster: Cluster, model_bytes: bytes, **config: object) -> None:
    cluster.replicas[0].register_task(task_config(**config), model_bytes)
    cluster.tick()


def _upload(
    coordinator: Coordinator,
    assignment: device_pb2.Assignment,
    delta: np.ndarray,
    example_count: int = 10,
) -> None:
    encoded = encode_for_upload(assignment.aggregation, delta, np.random.default_rng(0))
    header = sign_header(
        device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=assignment.upload_token,
            example_count=example_count,
            num_elements=encoded.num_elements,
            encoding=encoded.encoding,
            metrics=common_pb2.ClientMetrics(
                loss=1.0, accuracy=0.5, num_examples=example_count, num_batches=2
            ),
        )
    )
    coordinator.accept_upload(header, encoded.payload, len(encoded.payload))


def _deltas(count: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(NUM_PARAMETERS_SEED)
    return [rng.normal(0, 0.01, size).astype(np.float32) for _ in range(count)]


def _records(cluster: Cluster, task_id: str = "t1") -> list[RoundRecord]:
    return cluster.stores[0].rounds(task_id)


def _reference(
    tmp_path: pathlib.Path, model_bytes: bytes, deltas: list[np.ndarray], **config: object
) -> tuple[np.ndarray, RoundRecord]:
    """The same round on one coordinator with SQLite: what the cluster must commit."""
    clock = FakeClock()
    store = SqliteStore(tmp_path / "reference.sqlite")
    coordinator = make_coordinator(store, clock)
    coordinator.register_task(task_config(**config), model_bytes)
    assignments = [check_in(coordinator, f"d{i}").assignment for i in range(len(deltas))]
    for assignment, delta in zip(assignments, deltas, strict=True):
        _upload(coordinator, assignment, delta)
    coordinator.tick()
    record = store.rounds("t1")[0]
    weights = np.frombuffer(store.get_resource(record.weights_sha256) or b"", "<f4")
    store.close()
    return weights, record


@pytest.mark.parametrize(
    "aggregator",
    [
        "mean()",
        "robust_aggregator()",
        "compression_aggregator()",
        "dp_aggregator(noise_multiplier=0, clients_per_round=4)",
    ],
)
def test_three_replicas_commit_the_round_one_coordinator_would(
    cluster: Cluster, model_bytes: bytes, tmp_path: pathlib.Path, aggregator: str
) -> None:
    config = dict(target_reports=4, over_selection=1.0, aggregator=aggregator)
    _registered(cluster, model_bytes, **config)
    a, b, c = cluster.replicas
    size = a.task("t1").record.num_parameters
    deltas = _deltas(4, size)
    # Each device checks in on one replica and uploads to the next (round robin).
    assignments = [check_in(cluster.replicas[i % 3], f"d{i}").assignment for i in range(4)]
    for i, (assignment, delta) in enumerate(zip(assignments, deltas, strict=True)):
        _upload(cluster.replicas[(i + 1) % 3], assignment, delta)

    cluster.tick()

    expected_weights, expected = _reference(tmp_path, model_bytes, deltas, **config)
    (record,) = [r for r in _records(cluster) if r.state is RoundState.COMMITTED]
    weights = np.frombuffer(cluster.stores[0].get_resource(record.weights_sha256) or b"", "<f4")
    assert (record.selected, record.reported, record.dropped) == (4, 4, 0)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-6, atol=1e-7)
    state = {k: v for k, v in record.metrics.items() if k.startswith("aggregator")}
    want = {k: v for k, v in expected.metrics.items() if k.startswith("aggregator")}
    assert state.keys() == want.keys()
    np.testing.assert_allclose([state[k] for k in want], list(want.values()), rtol=1e-6)


def test_the_selection_quota_is_global(cluster: Cluster, model_bytes: bytes) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=1.5)  # quota 3

    answers = [check_in(cluster.replicas[i % 3], f"d{i}") for i in range(6)]

    outcomes = [answer.WhichOneof("outcome") for answer in answers]
    assert outcomes.count("assignment") == 3
    rejected = [a.rejection.reason for a in answers if a.HasField("rejection")]
    assert rejected == [device_pb2.Rejection.ROUND_FULL] * 3


def test_a_device_is_selected_once_per_round_whichever_replica_it_calls(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=2.0)

    first = check_in(cluster.replicas[0], "same")
    second = check_in(cluster.replicas[1], "same")

    assert first.HasField("assignment") and second.HasField("rejection")


def test_a_signed_check_in_replayed_to_another_replica_is_refused_in_a_later_round(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=1, over_selection=1.0)
    a, b, _ = cluster.replicas
    enroll(a, "d0")
    captured = signed_check_in("d0", cluster.clock.now())
    assignment = send_check_in(a, captured, "d0").assignment
    _upload(a, assignment, _deltas(1, a.task("t1").record.num_parameters)[0])
    cluster.tick()  # round 1 committed; the next check-in opens round 2
    assert [r.state for r in _records(cluster)] == [RoundState.COMMITTED]

    # Replica b never saw the nonce, and d0 holds no assignment in round 2: only the
    # cluster-wide record of assigned nonces stands between the replay and a device slot.
    with pytest.raises(Unauthenticated, match="replayed"):
        send_check_in(b, captured, "d0")

    assert check_in(b, "d1").HasField("assignment")  # round 2's slot is still free


def test_an_upload_is_counted_once_across_replicas(cluster: Cluster, model_bytes: bytes) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=1.5)
    a, b, _ = cluster.replicas
    assignment = check_in(a, "d0").assignment
    delta = _deltas(1, a.task("t1").record.num_parameters)[0]
    _upload(b, assignment, delta)

    with pytest.raises(AlreadyExists):
        _upload(a, assignment, delta)


def test_a_dead_replicas_uploads_count_as_dropouts_never_twice(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=3, over_selection=1.0, min_reports=1)
    a, b, c = cluster.replicas
    leader = cluster.leader()
    dying = next(r for r in cluster.replicas if r is not leader)
    living = [r for r in cluster.replicas if r is not dying]
    size = a.task("t1").record.num_parameters
    assignments = [check_in(living[0], f"d{i}").assignment for i in range(3)]
    deltas = _deltas(3, size)
    _upload(dying, assignments[0], deltas[0])  # then it dies before the round closes
    _upload(living[0], assignments[1], deltas[1])
    _upload(living[1], assignments[2], deltas[2])

    cluster.tick(living)  # closed at target; the leader waits for the silent replica
    waiting = _records(cluster)
    cluster.wait(1.2 * default_lease_s, living)  # silent for longer than a lease

    assert waiting == []
    (record,) = _records(cluster)
    assert record.state is RoundState.COMMITTED
    assert (record.selected, record.reported, record.dropped) == (3, 2, 1)
    assert record.metrics[f"round/dropouts/{REPLICA_LOST.lower()}"] == 1.0
    with pytest.raises((AlreadyExists, FailedPrecondition)):
        _upload(living[0], assignments[0], deltas[0])


def test_another_replica_takes_over_a_dead_leaders_task_within_the_lease(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=1.0, total_rounds=2)
    old = cluster.leader()
    living = [r for r in cluster.replicas if r is not old]
    size = old.task("t1").record.num_parameters
    assignments = [check_in(living[0], f"d{i}").assignment for i in range(2)]
    for assignment, delta in zip(assignments, _deltas(2, size), strict=True):
        _upload(living[1], assignment, delta)
    cluster.tick()
    committed = _records(cluster)
    check_in(living[0], "late")  # round 2 is open when the leader dies

    cluster.wait(default_lease_s + 2, living)  # the bound: lease + 2 s

    new = cluster.leader(living)
    lease = new.leadership.fence("t1")
    assert lease is not None and lease.epoch == 2
    records = _records(cluster)
    assert records[0] == committed[0]
    assert [(r.round_number, r.state) for r in records] == [
        (1, RoundState.COMMITTED),
        (2, RoundState.ABANDONED),
    ]
    # The new leader goes on from the committed model with a new round.
    cluster.tick(living)
    again = [check_in(living[i % 2], f"e{i}").assignment for i in range(2)]
    assert all(a.round_number == 3 for a in again)
    assert again[0].weights.sha256 == records[0].weights_sha256


def test_a_leader_paused_past_its_lease_commits_nothing(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=1.0)
    old = cluster.leader()
    living = [r for r in cluster.replicas if r is not old]
    size = old.task("t1").record.num_parameters
    assignments = [check_in(living[0], f"d{i}").assignment for i in range(2)]
    for assignment, delta in zip(assignments, _deltas(2, size), strict=True):
        _upload(old, assignment, delta)
    for _ in range(2):
        old.replicate()  # hands over and merges; the commit is next (SIGSTOP here)

    cluster.clock.advance(default_lease_s + 1)
    cluster.tick(living, passes=1)  # another replica takes the task
    old.driver.drive()  # the paused leader wakes up and tries to commit

    (record,) = _records(cluster)
    assert record.state is RoundState.ABANDONED
    assert old.task("t1").open_rounds == {}


def _secure_cluster(cluster: Cluster, model_bytes: bytes) -> ReplicaCoordinator:
    """A secure task on the cluster, each replica publishing an address; its leader."""
    for index, replica in enumerate(cluster.replicas):
        replica.address = f"127.0.0.{index + 1}:7000"
    _registered(
        cluster,
        model_bytes,
        aggregator="secure_aggregator()",
        target_reports=10,
        over_selection=1.0,
    )
    return cluster.leader()


def test_a_secure_task_is_served_by_replicas_and_hosted_by_its_leader(
    cluster: Cluster, model_bytes: bytes
) -> None:
    leader = _secure_cluster(cluster, model_bytes)

    assignment = check_in(leader, "d0").assignment

    assert assignment.secure_aggregation.session_id
    assert not leader.task("t1").fault
    for other in cluster.replicas:
        assert other.hosts_secure_rounds("t1") is (other is leader)


def test_a_replica_that_does_not_host_a_secure_task_refers_its_calls_to_the_host(
    cluster: Cluster, model_bytes: bytes
) -> None:
    leader = _secure_cluster(cluster, model_bytes)
    other = next(r for r in cluster.replicas if r is not leader)
    assignment = check_in(leader, "d0").assignment

    with pytest.raises(HostedElsewhere) as referred:
        check_in(other, "d1")
    with pytest.raises(HostedElsewhere) as token_referred:
        other.report_failure(
            sign_failure(
                device_pb2.FailureReport(
                    protocol_version=constants.PROTOCOL_VERSION,
                    upload_token=assignment.upload_token,
                    cause=device_pb2.FailureReport.INTERRUPTED,
                )
            )
        )
    session_host = other.secure_host_of_session(assignment.secure_aggregation.session_id)

    assert referred.value.address == leader.address
    assert token_referred.value.address == leader.address
    assert session_host == leader.address
    assert other.secure_host_of_session(b"no such session") is None


def test_a_secure_round_of_a_dead_host_is_abandoned_and_the_next_leader_hosts_the_next(
    cluster: Cluster, model_bytes: bytes
) -> None:
    leader = _secure_cluster(cluster, model_bytes)
    check_in(leader, "d0")
    living = [r for r in cluster.replicas if r is not leader]

    cluster.clock.advance(default_lease_s + 1)
    cluster.tick(living, passes=2)  # another replica takes the task over
    successor = cluster.leader(living)
    assignment = check_in(successor, "d1").assignment

    (record,) = _records(cluster)
    assert record.state is RoundState.ABANDONED and record.round_number == 1
    assert successor.task("t1").open_rounds.keys() == {2}
    assert assignment.round_number == 2


def test_a_cancelled_secure_task_has_its_open_round_recorded_abandoned_by_its_host(
    cluster: Cluster, model_bytes: bytes
) -> None:
    leader = _secure_cluster(cluster, model_bytes)
    check_in(leader, "d0")
    other = next(r for r in cluster.replicas if r is not leader)

    other.control_task("t1", TaskState.CANCELLED)  # an operator, at any replica
    cluster.tick()

    assert [r.state for r in _records(cluster)] == [RoundState.ABANDONED]
    assert leader.task("t1").open_rounds == {}


def test_a_secure_host_paused_past_its_lease_drops_its_round_and_refers_devices_onwards(
    cluster: Cluster, model_bytes: bytes
) -> None:
    paused = _secure_cluster(cluster, model_bytes)
    check_in(paused, "d0")
    living = [r for r in cluster.replicas if r is not paused]
    cluster.clock.advance(default_lease_s + 1)
    cluster.tick(living, passes=2)
    successor = cluster.leader(living)

    paused.tick()  # it wakes up
    with pytest.raises(HostedElsewhere) as referred:
        check_in(paused, "d1")

    assert paused.task("t1").open_rounds == {}
    assert not paused.hosts_secure_rounds("t1")
    assert referred.value.address == successor.address
    assert [r.state for r in _records(cluster)] == [RoundState.ABANDONED]


def test_a_restarted_replica_says_at_once_that_its_earlier_uploads_are_lost(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=1.0, min_reports=1)
    leader = cluster.leader()
    crashed = next(r for r in cluster.replicas if r is not leader)
    size = leader.task("t1").record.num_parameters
    assignments = [check_in(leader, f"d{i}").assignment for i in range(2)]
    deltas = _deltas(2, size)
    _upload(crashed, assignments[0], deltas[0])
    restarted = cluster.start(crashed.replica_name)  # the same replica, back at once
    _upload(leader, assignments[1], deltas[1])

    cluster.tick([r for r in cluster.replicas if r is not crashed] + [restarted])

    (record,) = _records(cluster)  # no wait for a partial that no longer exists
    assert record.state is RoundState.COMMITTED
    assert (record.reported, record.dropped) == (1, 1)
    assert record.metrics[f"round/dropouts/{REPLICA_LOST.lower()}"] == 1.0


def test_an_evaluation_task_sums_the_reports_of_every_replica(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes)
    a, b, c = cluster.replicas
    a.register_task(
        task_config(
            task_id="eval",
            kind="evaluation",
            evaluates="t1",
            total_rounds=1,
            target_reports=2,
            over_selection=1.0,
        ),
        b"",
    )
    a.control_task("t1", TaskState.PAUSED)  # only the evaluation takes devices
    cluster.tick()
    assignments = [check_in(r, f"d{i}").assignment for i, r in enumerate((a, b))]

    for replica, assignment, examples in zip((c, a), assignments, (7, 5), strict=True):
        header = sign_header(
            device_pb2.UploadHeader(
                protocol_version=constants.PROTOCOL_VERSION,
                upload_token=assignment.upload_token,
                example_count=examples,
                encoding=constants.REPORT_ENCODING_EVALUATION,
                metrics=common_pb2.ClientMetrics(
                    loss=1.0, accuracy=0.5, num_examples=examples, num_batches=1
                ),
            )
        )
        replica.accept_upload(header, b"", 0)
    cluster.tick()

    assert [a.kind for a in assignments] == [device_pb2.Assignment.EVALUATION] * 2
    (record,) = _records(cluster, "eval")
    assert record.state is RoundState.COMMITTED
    assert record.metrics["federated_eval/num_examples"] == 12.0
    assert record.metrics["aggregator/num_reports"] == 2.0


def test_a_replica_that_leaves_hands_its_tasks_over_at_once(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes)
    old = cluster.leader()
    living = [r for r in cluster.replicas if r is not old]

    old.leave()  # drained
    cluster.tick(living, passes=1)  # no lease time passes

    lease = cluster.leader(living).leadership.fence("t1")
    assert lease is not None and lease.epoch == 2
    assert old.replica_name not in [r.name for r in living[0].ledger.replicas()]


def test_a_networks_share_of_a_round_is_counted_across_replicas(
    cluster: Cluster, model_bytes: bytes
) -> None:
    # Quota 4, share 0.5: one network may take 2 slots, whichever replicas it calls.
    _registered(cluster, model_bytes, target_reports=4, over_selection=1.0, max_network_share=0.5)

    answers = [
        check_in(replica, f"n{i}", peer=f"ipv4:10.0.1.{i + 1}:999")
        for i, replica in enumerate(cluster.replicas)
    ]

    assert [a.WhichOneof("outcome") for a in answers] == ["assignment"] * 2 + ["rejection"]


def test_a_drained_replica_hands_over_the_uploads_of_rounds_still_open(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=2, over_selection=1.0)
    leader = cluster.leader()
    draining = next(r for r in cluster.replicas if r is not leader)
    size = leader.task("t1").record.num_parameters
    assignments = [check_in(leader, f"d{i}").assignment for i in range(2)]
    deltas = _deltas(2, size)
    _upload(draining, assignments[0], deltas[0])

    abandon_open_rounds(draining)  # what `serve` does at the end of a drain
    draining.leave()
    _upload(leader, assignments[1], deltas[1])
    cluster.tick([r for r in cluster.replicas if r is not draining])

    (record,) = _records(cluster)
    assert record.state is RoundState.COMMITTED
    assert (record.reported, record.dropped) == (2, 0)


def test_every_replica_learns_how_long_a_round_reported_for_pace_steering(
    cluster: Cluster, model_bytes: bytes
) -> None:
    _registered(cluster, model_bytes, target_reports=3, over_selection=1.0)
    size = cluster.replicas[0].task("t1").record.num_parameters
    assignments = [check_in(cluster.replicas[i], f"d{i}").assignment for i in range(3)]
    cluster.tick()  # every replica mirrors the shared round, reporting from now
    cluster.clock.advance(4.0)
    for i, (assignment, delta) in enumerate(zip(assignments, _deltas(3, size), strict=True)):
        _upload(cluster.replicas[i], assignment, delta)

    cluster.tick()

    assert [r.state for r in _records(cluster)] == [RoundState.COMMITTED]
    for replica in cluster.replicas:
        demand = replica.task("t1").round_demand()
        assert demand is not None and demand.quota == 3
        assert demand.reporting_s == pytest.approx(4.0)
