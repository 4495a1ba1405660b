"""A coordinator that is one of several replicas on one PostgreSQL database
(`overnight serve --replica`).

Any replica answers any device. What must be global lives in PostgreSQL
(server/replica_ledger.py): each open round's counts and state, every assignment's fate. What
is heavy stays local: each replica accumulates the uploads it accepts into its own copy of the
round's aggregator (a *mirror* of the shared round) and hands that partial over when the round
closes. Each task has one leader, by lease (server/task_leadership.py): it opens rounds, applies
their deadlines, merges the partials and commits with its lease as a fence, through the same
round driver a single coordinator uses.

- A replica that drains hands its partials of rounds still open over early and leaves.
- A replica that dies loses the uploads it had not handed over: the leader waits for its
  partial until the replica has been silent for a lease time, then commits without it, and
  those assignments count as dropouts (`round/dropouts/replica_lost`). Their tokens are
  marked reported in PostgreSQL, so they are never counted twice.
- When a leader dies, another replica takes its lease within the lease time; on taking a task
  it records every round still open as abandoned, as a single coordinator does on a restart,
  and reloads the task's model and state from the store. A leader that was paused past its
  lease and wakes up has a stale epoch: its commits are refused (StaleLeader) and it drops
  its rounds.
- A secure_aggregator() task's rounds are hosted by its leader alone, as one coordinator
  runs them: its SecAgg sessions live in that process. The leader selects every device of
  them (so their counts are global), records their assignments in the store and commits
  under its lease. Another replica refers the task's calls to the host (HostedElsewhere,
  server/replica_secure_host.py), and its gRPC layer forwards them there
  (server/replica_forwarding.py). A host that loses its lease drops its secure rounds; the
  next leader abandons them, as on a restart, and hosts the next round.
- Pace steering (retry windows, check-in capacity) and the per-network rate limits are each
  replica's own, measured from the check-ins it answers.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from math import isfinite

import numpy as np

from device_runtime.clock import Clock
from device_runtime.logs import about
from protos import device_pb2
from server.aggregation import Buffer, accumulate_received
from server.aggregators.presets import parse_aggregator
from server.coordinator import Coordinator, CoordinatorSettings, token_digest
from server.device_identity import DeviceIdentities
from server.errors import HostedElsewhere, StaleLeader, StoreUnavailable
from server.evaluation import HeldOutEvaluator
from server.example_credit import credited_header
from server.leases import Lease, default_lease_s
from server.postgres_store import PostgresStore
from server.replica_driver import ReplicaDriver
from server.replica_ledger import ReplicaLedger
from server.replica_partials import RoundPartial, to_bytes
from server.replica_secure_host import SecureHosting
from server.reports import add_upload
from server.retention import Retention
from server.rounds import closed
from server.rounds.round import AssignmentState, RoundInProgress
from server.secure_routes import SecureRoutes
from server.shared_rounds import ReplicaRow, SharedRound, SharedState, mirror_state
from server.store import AssignmentRecord, RoundRecord, RoundState, TaskRecord
from server.task_leadership import TaskLeadership
from server.task_runtime import TaskRuntime

log = logging.getLogger(__name__)


class SelectionClosed(Exception):
    """The shared round took no more devices (filled or closed by another replica)."""


class ReplicaCoordinator(SecureHosting):
    def __init__(
        self,
        store: PostgresStore,
        clock: Clock,
        name: str,
        settings: CoordinatorSettings | None = None,
        evaluator: HeldOutEvaluator | None = None,
        rng: np.random.Generator | None = None,
        identities: DeviceIdentities | None = None,
        lease_s: float = default_lease_s,
    ) -> None:
        self.replica_name = name
        self.ledger = ReplicaLedger(store)
        # Leases are held by this run of the replica: two processes given the same name (or
        # a quick restart) never both lead a task.
        run = secrets.token_hex(3)
        self.leadership = TaskLeadership(store, clock, f"{name}#{run}", lease_s)
        self.started_at = clock.now()
        self.check_ins = 0
        self.uploads = 0
        self._taken_over: dict[str, int] = {}  # task -> lease epoch whose takeover is done
        self._merged: set[tuple[str, int]] = set()  # rounds this leader merged, not yet ended
        # Closed rounds this replica had no mirror of, checked for uploads of its earlier run.
        self._lost_checked: set[tuple[str, int]] = set()
        # Secure tasks: their rounds are hosted by their leader (see the module's docstring).
        self.secure_task_ids: set[str] = set()
        self.routes = SecureRoutes(store)
        self.address = ""  # where other replicas reach this one (set before serving)
        self.forwarded_calls: Callable[[], int] = lambda: 0  # by its gRPC layer, so far
        self._secure_hosts: dict[str, str] = {}  # task -> its leader's address, per pass
        self._published: set[tuple[str, int]] = set()  # secure rounds whose session is routed
        super().__init__(store, clock, settings, evaluator, rng, identities)
        self.driver = ReplicaDriver(self, retention=Retention(self.settings.retention))

    # ----- tasks ---------------------------------------------------------------------------

    def _abandon_lost_rounds(self, task_id: str, fence: Lease | None = None) -> None:
        # Other replicas may have rounds open: only a new leader abandons them (_take_over).
        if fence is not None:
            super()._abandon_lost_rounds(task_id, fence)

    def _load_task(self, record: TaskRecord) -> TaskRuntime:
        runtime = super()._load_task(record)
        if parse_aggregator(record.config.aggregator).secure is not None:
            self.secure_task_ids.add(record.config.task_id)
        return runtime

    def fence(self, task_id: str) -> Lease | None:
        lease = self.leadership.fence(task_id)
        if lease is None:
            raise StaleLeader(f"task {task_id!r}: {self.replica_name} does not lead it now")
        return lease

    # ----- requests ------------------------------------------------------------------------

    def check_in(
        self, request: device_pb2.CheckInRequest, peer: str = ""
    ) -> device_pb2.CheckInResponse:
        self.check_ins += 1
        return super().check_in(request, peer)

    def _selecting_round(self, task: TaskRuntime) -> RoundInProgress | None:
        # The leader opens rounds; a replica only mirrors them. A secure task's rounds are
        # its host's: elsewhere the check-in is referred there.
        if task.task_id not in self.secure_task_ids:
            return task.selecting
        address = self._secure_host(task.task_id)
        if address is not None:
            raise HostedElsewhere(task.task_id, address)
        return Coordinator._selecting_round(self, task)

    def _assign(
        self,
        task: TaskRuntime,
        round_: RoundInProgress,
        request: device_pb2.CheckInRequest,
        device_id: str,
        network: str | None,
        active: int,
    ) -> device_pb2.CheckInResponse:
        try:
            return super()._assign(task, round_, request, device_id, network, active)
        except SelectionClosed:
            now = self.now()
            window = self._steer(task, active, now)
            return self._reject(device_pb2.Rejection.ROUND_FULL, "round is full", window)

    def _record_assignment(
        self,
        record: AssignmentRecord,
        declared_examples: int,
        network: str | None,
        check_in_nonce: bytes,
    ) -> None:
        task = self.task(record.task_id)
        if task.task_id in self.secure_task_ids:
            self._record_secure_assignment(task, record)
            return
        # Each replica remembers the nonces it saw (device_identity.py); the ledger makes a
        # check-in replayed to another replica fail there too, before it takes a device slot.
        shared = self.ledger.assign(
            record,
            declared_examples,
            network,
            self.replica_name,
            task.config,
            self.now(),
            check_in_nonce,
            self.identities.nonce_kept_s,
        )
        round_ = task.open_rounds.get(record.round_number)
        if shared is None:
            raise SelectionClosed()
        if round_ is not None:
            mirror_state(round_, shared)

    def advance(self, task: TaskRuntime, round_: RoundInProgress) -> None:
        if task.task_id in self.secure_task_ids:  # hosted here, as by one coordinator
            Coordinator.advance(self, task, round_)
            return
        # A shared round's state follows its counts in PostgreSQL (replica_ledger); rounds
        # this leader merged wait for the driver.
        if round_.state in (RoundState.AGGREGATING, RoundState.FAILED):
            self.driver.wake()

    def _open_assignment(self, token: bytes) -> tuple[TaskRuntime, RoundInProgress, str]:
        digest = token_digest(token) if token else ""
        shared = None
        if digest and digest not in self._issued:
            shared = self.ledger.assignment(digest)  # issued by another replica
            if shared is None:
                self._refer_secure_token(digest)
            elif shared.task_id in self._tasks:
                task = self._tasks[shared.task_id]
                self._issued[digest] = (shared.task_id, shared.round_number)
                if shared.round_number not in task.open_rounds:
                    self._mirror(task, self.ledger.unfinished_rounds(task.task_id))
        task, round_, digest = super()._open_assignment(token)
        if shared is not None and digest not in round_.assignments:
            round_.assign(shared.device_id, digest, shared.declared_examples)
            if shared.state == AssignmentState.REPORTED.value:
                round_.set_state(digest, AssignmentState.REPORTED)
            elif shared.state == AssignmentState.FAILED.value:
                round_.set_state(digest, AssignmentState.FAILED, shared.failure)
        return task, round_, digest

    def accept_upload(
        self,
        header: device_pb2.UploadHeader,
        payload: Buffer | Sequence[Buffer],
        wire_bytes: int,
    ) -> device_pb2.UploadResponse:
        """As Coordinator.accept_upload, with the upload counted once for the cluster before
        it is added to this replica's partial (and the count taken back if it is refused).
        A secure round's report (its metrics; the update went masked to its session) is
        taken on its host as by one coordinator."""
        task, round_, digest = self._reportable(header)
        if task.task_id in self.secure_task_ids:
            add_upload((task, round_, digest), header, payload, wire_bytes)
            Coordinator.advance(self, task, round_)
            self.uploads += 1
            now = self.now()
            window = self._steer(task, self._active_devices(task, now), now)
            return device_pb2.UploadResponse(retry_window=window)
        header = credited_header(header, task.config, round_.assignments[digest])
        shared = self.ledger.reserve_report(digest, self.replica_name, task.config, self.now())
        chunks = [payload] if isinstance(payload, bytes | memoryview) else payload
        try:
            accumulate_received(round_.aggregate, header, chunks)
        except BaseException:
            try:
                self.ledger.release_report(digest, self.replica_name)
            except StoreUnavailable as exc:  # not in our partial: the leader counts it lost
                log.error("upload refused but its count not taken back: %s", exc)
            raise
        round_.client_metrics.accumulate(header.metrics)
        round_.upload_bytes += wire_bytes
        round_.set_state(digest, AssignmentState.REPORTED)
        mirror_state(round_, shared)
        self.uploads += 1
        now = self.now()
        window = self._steer(task, self._active_devices(task, now), now)
        return device_pb2.UploadResponse(retry_window=window)

    def report_failure(self, report: device_pb2.FailureReport) -> device_pb2.FailureAck:
        ack = super().report_failure(report)
        digest = token_digest(report.upload_token)
        task_id, number = self._issued[digest]
        if task_id in self.secure_task_ids:
            return ack
        task = self._tasks[task_id]
        round_ = task.open_rounds[number]
        try:
            cause = device_pb2.FailureReport.Cause.Name(report.cause)
            shared = self.ledger.fail_assignment(digest, cause, task.config, self.now())
        except BaseException:
            round_.set_state(digest, AssignmentState.ASSIGNED)
            raise
        mirror_state(round_, shared)
        return ack

    # ----- ending rounds -------------------------------------------------------------------

    def forget(self, task: TaskRuntime, round_: RoundInProgress) -> None:
        super().forget(task, round_)
        key = (task.task_id, round_.round_number)
        self._published.discard(key)
        if key in self._merged:
            self._merged.discard(key)
            final = {
                RoundState.COMMITTED: SharedState.COMMITTED,
                RoundState.FAILED: SharedState.FAILED,
            }.get(round_.state, SharedState.ABANDONED)
            try:
                self.ledger.finish(task.task_id, round_.round_number, final, self.now())
            except StoreUnavailable as exc:  # the next leader finds the record and finishes it
                log.warning("task %s: round %d not marked ended: %s", task.task_id, key[1], exc)

    def abandon(self, task: TaskRuntime, round_: RoundInProgress) -> RoundRecord:
        """A round this leader merged is recorded abandoned under its lease. A mirror (a
        drain, a cancel, a fault here) is handed over as it stands and dropped: the shared
        round goes on, and its leader counts these uploads when it closes. A secure round
        hosted here is recorded under the lease, as one coordinator records it; without the
        lease it is dropped, for the next leader to record."""
        record = closed.summarize(round_, RoundState.ABANDONED, self.now())
        fence = self.leadership.fence(task.task_id)
        recorded = (task.task_id, round_.round_number) in self._merged and fence is not None
        secure = task.task_id in self.secure_task_ids
        if secure:  # hosted here: recorded while it leads, else by the next leader
            recorded = fence is not None
        if recorded:
            self.store.record_closed_round(record, fence)
        elif (
            not secure
            and round_.reported
            and (task.task_id, round_.round_number) not in self._merged
        ):
            self._hand_over(task, round_, early=True)
        round_.state = RoundState.ABANDONED
        self.forget(task, round_)
        if recorded:
            self.notify(task, record)
        return record

    def _hand_over(self, task: TaskRuntime, round_: RoundInProgress, early: bool = False) -> None:
        """Leaves this replica's partial of the round for its leader (`early`: before the
        round closed, as a replica that stops does)."""
        partial = RoundPartial(
            round_.aggregate, round_.client_metrics, round_.upload_bytes, round_.broadcast_bytes
        )
        key = (task.task_id, round_.round_number)
        tokens = round_.counted_tokens()
        if not self.ledger.hand_over(*key, self.replica_name, tokens, to_bytes(partial), early):
            log.warning(
                "task %s: round %d merged without this replica's %d uploads",
                *key,
                round_.reported,
                extra=about(*key),
            )

    def leave(self) -> None:
        """A replica that stops (drained): hands its tasks back at once and drops its
        heartbeat, so no leader waits a lease time for partials it will never send."""
        self.leadership.release_all()
        self.ledger.remove_replica(self.replica_name)

    # ----- replication: one pass of the replica's loop -------------------------------------

    def replicate(self) -> None:
        """Heartbeat, leases, new tasks and operator decisions, then per task: the leader's
        steps, this replica's mirrors and handovers, and merges of closed rounds."""
        now = self.now()
        self.ledger.heartbeat(
            ReplicaRow(
                self.replica_name,
                socket.gethostname(),
                os.getpid(),
                self.started_at,
                now,
                self.check_ins,
                self.uploads,
                self.address,
                self.forwarded_calls(),
            )
        )
        self._follow_tasks()
        served = [t.task_id for t in self.tasks() if not t.fault]
        if self.leadership.due():
            self.leadership.refresh(served)
        else:
            leases = {lease.task_id: lease for lease in self.ledger.leases()}
            self.leadership.take_expired(
                t for t in served if t not in leases or not leases[t].live_at(now)
            )
        if self.secure_task_ids:
            self._secure_hosts = self.routes.leader_addresses(now)
        shared = self.ledger.unfinished_rounds()
        for task in self.tasks():
            mine = [r for r in shared if r.task_id == task.task_id]
            try:
                if task.task_id in self.secure_task_ids:
                    self._host_secure(task)
                    continue
                if self.leadership.leads(task.task_id) and not task.fault:
                    task = self._lead(task, mine)
                    mine = self.ledger.unfinished_rounds(task.task_id)
                self._mirror(task, mine)
                if self.leadership.leads(task.task_id) and not task.fault:
                    self._merge_closed(task, mine)
            except StoreUnavailable as exc:
                log.error("task %s: replication pass failed: %s", task.task_id, exc)

    def _follow_tasks(self) -> None:
        """Tasks registered and decisions made on other replicas; commits of other leaders."""
        for record in self.store.tasks():
            task = self._tasks.get(record.config.task_id)
            if task is None:
                self._load_task(record)
            elif task.state is not record.state:
                task.state = record.state
        committed = self.ledger.committed_rounds()
        for task in self.tasks():
            if not self.leadership.leads(task.task_id):
                task.committed_rounds = committed.get(task.task_id, 0)

    def _mirror(self, task: TaskRuntime, shared: list[SharedRound]) -> None:
        """Keeps a mirror of each open shared round; hands a closed one's partial over."""
        rows = {r.round_number: r for r in shared}
        for number, round_ in list(task.open_rounds.items()):
            if (task.task_id, number) in self._merged:
                continue
            row = rows.get(number)
            if row is not None and row.state.open:
                mirror_state(round_, row)
                continue
            if row is not None and row.state is SharedState.AGGREGATING:
                if isfinite(row.closed_at - row.reporting_started_at):
                    # As one coordinator measures its own rounds: for pace steering's windows.
                    task.record_reporting(row.closed_at - row.reporting_started_at)
                if round_.reported:
                    # A mirror without uploads hands nothing over; the check below still tells
                    # the leader of counts it took but could not keep (refused after counting).
                    self._lost_checked.add((task.task_id, number))
                    self._hand_over(task, round_)
            round_.state = RoundState.AGGREGATING if row is not None else RoundState.ABANDONED
            Coordinator.forget(self, task, round_)
            if row is None:  # ended meanwhile; how is in the store, not known here
                task.recent_outcomes.pop(number, None)
        # Bounded: only rounds still unfinished are remembered.
        self._lost_checked = {k for k in self._lost_checked if k[0] != task.task_id or k[1] in rows}
        for row in shared:
            key = (task.task_id, row.round_number)
            if (
                row.state is SharedState.AGGREGATING
                and row.round_number not in task.open_rounds
                and key not in self._lost_checked
            ):
                # Uploads an earlier run of this replica (same name) accepted are gone with
                # it: saying so at once spares the leader its wait for a partial.
                self._lost_checked.add(key)
                if self.ledger.reported_by(self.replica_name, *key) > 0:
                    self.ledger.hand_over(*key, self.replica_name, [], b"")
            if row.state.open and row.round_number not in task.open_rounds:
                round_ = RoundInProgress(
                    task.task_id,
                    row.round_number,
                    self._round_aggregator(task, row),
                    row.started_at,
                    base_weights_sha256=row.base_weights_sha256,
                    base_version=row.base_version,
                )
                mirror_state(round_, row)
                task.open_rounds[row.round_number] = round_


def replica_name(address: str) -> str:
    """A replica's default name: host, pid and device address (unique while it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}@{address}"
