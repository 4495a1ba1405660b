"""The steps of a replica for secure_aggregator() tasks (server/replica_coordinator.py is the
rest of a replica): a secure task's rounds are hosted by its leader alone, as one coordinator
runs them, and every other replica refers the task's calls there (HostedElsewhere), for its
gRPC layer to forward (server/replica_forwarding.py). docs/scaling.md, "Secure aggregation on
replicas", has the design.
"""

from __future__ import annotations

import logging

from device_runtime.logs import about
from server.errors import HostedElsewhere, Unavailable
from server.replica_leader import ReplicaLeader
from server.secure_routes import SecureRoutes
from server.store import AssignmentRecord
from server.task_runtime import TaskRuntime

log = logging.getLogger(__name__)


class SecureHosting(ReplicaLeader):
    """ReplicaCoordinator sets these up."""

    routes: SecureRoutes
    address: str  # where other replicas reach this one
    _secure_hosts: dict[str, str]  # task -> its leader's address, as of the last pass
    _published: set[tuple[str, int]]  # secure rounds hosted here whose session is routed

    def hosts_secure_rounds(self, task_id: str) -> bool:
        """Whether this replica hosts the secure task's rounds now: it leads the task and has
        taken it over under its current lease."""
        fence = self.leadership.fence(task_id)
        return fence is not None and self._taken_over.get(task_id) == fence.epoch

    def _secure_host(self, task_id: str) -> str | None:
        """The address of the replica hosting the secure task's rounds, if another one does.
        Raises Unavailable when no replica hosts them now (a takeover under way)."""
        if self.hosts_secure_rounds(task_id):
            return None
        address = self._secure_hosts.get(task_id)
        if address is None or address == self.address:
            raise Unavailable(
                f"task {task_id!r}: no replica hosts its secure rounds now; retry",
                retry_after_s=1.0,
            )
        return address

    def secure_host_of_session(self, session_id: bytes) -> str | None:
        """Where a SecAgg call for a session this replica does not host goes: the address of
        its task's host; None when no replica published the session (answered here, as an
        unknown session). Raises Unavailable (no host now) or StoreUnavailable."""
        task_id = self.routes.session_task(session_id)
        return None if task_id is None else self._secure_host(task_id)

    def _record_secure_assignment(self, task: TaskRuntime, record: AssignmentRecord) -> None:
        """A secure round's assignment, on its host: the round's session is published for
        the other replicas' routing before its first device hears of it."""
        key = (task.task_id, record.round_number)
        aggregate = self.secure_rounds.aggregator(task.open_rounds[record.round_number])
        if aggregate is not None and key not in self._published:
            self.routes.publish_session(aggregate.enrollment.session_id, *key)
            self._published.add(key)
        self.store.add_assignment(record)

    def _refer_secure_token(self, digest: str) -> None:
        """Raises HostedElsewhere for a token of a secure task hosted by another replica."""
        stored = self.store.assignment(digest)
        if stored is not None and stored.task_id in self.secure_task_ids:
            address = self._secure_host(stored.task_id)
            if address is not None:
                raise HostedElsewhere(stored.task_id, address)

    def _host_secure(self, task: TaskRuntime) -> None:
        """A secure task's step: its leader takes it over (abandoning what an earlier host
        left open) and hosts its rounds; a replica that lost the lead drops its rounds
        unrecorded, for the new leader to record."""
        if self.leadership.leads(task.task_id) and not task.fault:
            self._lead(task, [])
        elif task.open_rounds:
            log.warning(
                "task %s: no longer leads it; its %d secure rounds here are dropped",
                task.task_id,
                len(task.open_rounds),
                extra=about(task.task_id),
            )
            self.step_down(task)
